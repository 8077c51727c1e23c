//! Shell completions and the man page, generated from the very `Command` that parses, so
//! they never miss a flag. Packagers run `PROGRAM --generate bash` (zsh, fish, elvish,
//! powershell) and `PROGRAM --generate man`.

use std::io::Write;

use clap::Command;
use clap_complete::Shell;

/// What `--generate` writes.
pub(super) const TARGETS: [&str; 6] = ["bash", "zsh", "fish", "elvish", "powershell", "man"];

/// Writes the completion script for a shell of [`TARGETS`], or the man page (roff).
pub(super) fn write(mut cmd: Command, what: &str, out: &mut dyn Write) -> std::io::Result<()> {
    if what == "man" {
        return clap_mangen::Man::new(cmd).render(out);
    }
    let shell: Shell = what
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let name = cmd.get_name().to_string();
    // clap_complete panics on a failed write (a closed pipe): it writes to memory here.
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, name, &mut script);
    out.write_all(&script)
}
