//! What both programs' `main` needs around the command line: flags from the command line,
//! the environment and a config file ([`parse`]), one-line usage errors, logging to stderr,
//! the stop signals, and the shared token file.

use std::ffi::OsString;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Arg, ArgAction, Command, CommandFactory, FromArgMatches};

use crate::exit::{fail, Failure};
use protocol::{AuthToken, MAX_TOKEN_LEN};

mod config;
mod generate;
#[cfg(test)]
mod tests_config;

/// The program's `Command` with what this module adds to both programs: `--config`,
/// `--check-config`, the hidden `--generate`, and a word in `--help` on the environment
/// and the file.
pub fn command<T: CommandFactory>() -> Command {
    let cmd = T::command();
    let help = match cmd.get_after_help() {
        Some(before) => format!("{before}\n\n{}", config::help_text(&cmd)),
        None => config::help_text(&cmd),
    };
    let prefix = config::env_prefix(&cmd);
    let name = cmd.get_name().to_string();
    cmd.after_help(help)
        .arg(
            Arg::new(config::CONFIG)
                .long("config")
                .value_name("FILE")
                .value_parser(clap::value_parser!(PathBuf))
                .help(format!(
                    "Read options from this TOML file, keys named like the long options \
                     (e.g. `--config /etc/capstream/{name}.toml`); also {prefix}_CONFIG"
                )),
        )
        .arg(
            Arg::new(config::CHECK_CONFIG)
                .long("check-config")
                .action(ArgAction::SetTrue)
                .help(
                    "Check the options from the command line, the environment and --config, \
                     print them as one command line, and exit: 0 when valid, 2 if not \
                     (e.g. `--config prod.toml --check-config`)",
                ),
        )
        .arg(
            Arg::new(config::GENERATE)
                .long("generate")
                .value_name("WHAT")
                .value_parser(generate::TARGETS)
                .hide(true)
                .help("Write a shell completion script or the man page to stdout"),
        )
}

/// What the command line, the environment and the config file ask for.
enum Outcome<T> {
    Run(T),
    /// `--generate WHAT`.
    Generate(String),
    /// `--check-config`: the options as one command line.
    Check(Vec<OsString>),
}

/// Why they cannot be used: clap's error, with where the flag it names came from when that
/// was not the command line; or a problem with the environment or the file.
enum Refusal {
    Clap(clap::Error, Option<String>),
    Config(String),
}

/// Parses the program's options from its command line, the environment
/// (`CAPSTREAM_<PROGRAM>_<OPTION>`) and the `--config` file, in that precedence, before
/// clap's defaults. `Err` holds the exit code once help, version, `--generate` or
/// `--check-config` has been written, or a one-line usage error (exit 2).
pub fn parse<T: CommandFactory + FromArgMatches>() -> Result<T, ExitCode> {
    let cmd = command::<T>();
    let program = cmd.get_name().to_string();
    let prefix = format!("{}_", config::env_prefix(&cmd));
    let mut vars = Vec::new();
    for (name, value) in std::env::vars_os() {
        let Some(name) = name.to_str().filter(|n| n.starts_with(&prefix)) else {
            continue;
        };
        match value.into_string() {
            Ok(value) => vars.push((name.to_string(), value)),
            Err(_) => {
                return Err(fail(
                    &program,
                    Failure::BadInput,
                    format_args!("environment variable {name} is not UTF-8"),
                ));
            }
        }
    }
    match resolve::<T>(cmd.clone(), std::env::args_os().collect(), &vars) {
        Ok(Outcome::Run(cli)) => Ok(cli),
        Ok(Outcome::Generate(what)) => {
            let mut out = std::io::stdout().lock();
            match generate::write(cmd, &what, &mut out).and_then(|()| out.flush()) {
                Ok(()) => Err(ExitCode::SUCCESS),
                Err(e) => Err(fail(
                    &program,
                    Failure::RunFailed,
                    format_args!("cannot write {what}: {e}"),
                )),
            }
        }
        Ok(Outcome::Check(args)) => {
            println!("{}", shell_words(&args));
            Err(ExitCode::SUCCESS)
        }
        Err(Refusal::Clap(e, origin)) => Err(usage_error(&program, e, origin)),
        Err(Refusal::Config(what)) => Err(fail(&program, Failure::BadInput, what)),
    }
}

fn resolve<T: FromArgMatches>(
    cmd: Command,
    argv: Vec<OsString>,
    vars: &[(String, String)],
) -> Result<Outcome<T>, Refusal> {
    let clap_error = |e| Refusal::Clap(e, None);
    // What the command line alone says, whatever it lacks; help and version stop here.
    let given = cmd
        .clone()
        .ignore_errors(true)
        .try_get_matches_from(&argv)
        .map_err(clap_error)?;
    if let Some(what) = given.get_one::<String>(config::GENERATE) {
        return Ok(Outcome::Generate(what.clone()));
    }
    if given.subcommand_name().is_some() {
        // Subcommands (`receiver certs ...`) take their options from the command line only.
        let mut matches = cmd.try_get_matches_from(&argv).map_err(clap_error)?;
        return T::from_arg_matches_mut(&mut matches)
            .map(Outcome::Run)
            .map_err(clap_error);
    }
    let config_var = format!("{}_CONFIG", config::env_prefix(&cmd));
    let file = given
        .get_one::<PathBuf>(config::CONFIG)
        .cloned()
        .or_else(|| {
            vars.iter()
                .find(|(name, value)| *name == config_var && !value.is_empty())
                .map(|(_, value)| PathBuf::from(value))
        });
    let layered = config::layer(&cmd, &given, vars, file.as_deref()).map_err(Refusal::Config)?;
    let mut args: Vec<OsString> = argv.iter().take(1).cloned().collect();
    args.extend(layered.args.iter().cloned());
    args.extend(argv.iter().skip(1).cloned());
    let with_origin = |e: clap::Error| {
        let origin = layered.origin_of(&e).map(ToString::to_string);
        Refusal::Clap(e, origin)
    };
    let mut matches = cmd.try_get_matches_from(&args).map_err(with_origin)?;
    let check = matches.get_flag(config::CHECK_CONFIG);
    let cli = T::from_arg_matches_mut(&mut matches).map_err(with_origin)?;
    if check {
        args.retain(|a| a != "--check-config");
        return Ok(Outcome::Check(args));
    }
    Ok(Outcome::Run(cli))
}

/// Arguments as a shell would need them typed.
fn shell_words(args: &[OsString]) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./:=@,+%".contains(c);
    args.iter()
        .map(|a| {
            let a = a.to_string_lossy();
            if !a.is_empty() && a.chars().all(plain) {
                a.into_owned()
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Shortest shared token either program accepts: a guessable one would be no check at all.
pub const MIN_TOKEN_LEN: usize = 16;

/// Help and version go to stdout as clap renders them; a usage error becomes one line,
/// `PROGRAM: error: ...`, with exit code 2.
/// `origin` says where the value clap refuses came from when not from the command line.
fn usage_error(program: &str, e: clap::Error, origin: Option<String>) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        let _ = e.print();
        return ExitCode::SUCCESS;
    }
    // A command that does nothing without a subcommand (`receiver certs`): its help.
    if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        let _ = e.print();
        return ExitCode::from(2);
    }
    let rendered = e.render().to_string();
    // clap's message spans several lines (what, then the arguments involved, then usage):
    // keep everything before the usage, joined.
    let what: Vec<&str> = rendered
        .lines()
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("tip:"))
        .collect();
    let what = what.join(" ");
    let what = what.strip_prefix("error: ").unwrap_or(&what);
    match origin {
        Some(origin) => fail(
            program,
            Failure::BadInput,
            format_args!("{what}, from {origin} (see '{program} --help')"),
        ),
        None => fail(
            program,
            Failure::BadInput,
            format_args!("{what} (see '{program} --help')"),
        ),
    }
}

/// Logs to stderr at info level unless RUST_LOG says otherwise; colour only on a terminal.
/// Log lines clear the live status line (see [`crate::status`]) rather than run into it.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // object_store and rskafka log every retried request; the receiver says once why.
        .unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new("info,object_store=warn,rskafka=warn")
        });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(crate::status::Stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
}

/// SIGINT and SIGTERM on Unix; Ctrl-C elsewhere. The handlers are installed on creation, so
/// a signal that comes before the first wait is not lost.
pub struct Signals {
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
}

impl Signals {
    #[cfg(unix)]
    pub fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
        })
    }

    #[cfg(not(unix))]
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {})
    }

    #[cfg(unix)]
    pub async fn next(&mut self) {
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
        }
    }

    #[cfg(not(unix))]
    pub async fn next(&mut self) {
        if tokio::signal::ctrl_c().await.is_err() {
            // No console: never signalled.
            std::future::pending::<()>().await;
        }
    }
}

/// Reads a shared token file (`--token-file`): its content without surrounding whitespace,
/// [`MIN_TOKEN_LEN`] to [`MAX_TOKEN_LEN`] bytes. The second value is a warning to log when
/// others than the file's owner may read it. Errors never show the file's content.
pub fn read_token_file(path: &Path) -> Result<(AuthToken, Option<String>), String> {
    let shown = path.display();
    let raw = std::fs::read(path).map_err(|e| format!("cannot read token file {shown}: {e}"))?;
    let secret = raw.trim_ascii();
    if secret.len() < MIN_TOKEN_LEN {
        return Err(format!(
            "token file {shown} holds {} byte(s), fewer than the {MIN_TOKEN_LEN} a token needs \
             (make one with: head -c 32 /dev/urandom | base64 > {shown})",
            secret.len()
        ));
    }
    let token = AuthToken::new(secret.to_vec()).ok_or_else(|| {
        format!(
            "token file {shown} holds {} bytes, more than the limit of {MAX_TOKEN_LEN}",
            secret.len()
        )
    })?;
    Ok((token, readable_by_others(path, "token file")))
}

/// A warning when the secret file `path` (`what`, e.g. "token file") may be read by others
/// than its owner.
#[cfg(unix)]
pub fn readable_by_others(path: &Path, what: &str) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o077 != 0).then(|| {
        format!(
            "{what} {} may be read by others than its owner (mode {mode:03o}): chmod 600 it",
            path.display()
        )
    })
}

/// A warning when the secret file `path` may be read by others: none where modes do not say.
#[cfg(not(unix))]
pub fn readable_by_others(_path: &Path, _what: &str) -> Option<String> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_files_are_trimmed_and_bounded() {
        let dir = std::env::temp_dir().join(format!("program-token-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        let read = |content: &[u8]| {
            std::fs::write(&file, content).unwrap();
            read_token_file(&file)
        };
        let (token, _) = read(b"  0123456789abcdef0123\n").unwrap();
        assert_eq!(token.as_bytes(), b"0123456789abcdef0123");
        for bad in [
            &b""[..],
            b" \n",
            b"short-token\n",
            &[b'x'; MAX_TOKEN_LEN + 1],
        ] {
            let e = read(bad).unwrap_err();
            assert!(
                e.contains("token file") && !e.contains("short-token"),
                "{e}"
            );
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            read(b"0123456789abcdef").unwrap();
            let mode = |m| std::fs::set_permissions(&file, std::fs::Permissions::from_mode(m));
            mode(0o644).unwrap();
            assert!(read_token_file(&file)
                .unwrap()
                .1
                .unwrap()
                .contains("chmod 600"));
            mode(0o600).unwrap();
            assert_eq!(read_token_file(&file).unwrap().1, None);
        }
        assert!(read_token_file(&dir.join("missing")).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
