//! Every flag of a program from three places besides its command line: the environment
//! (`CAPSTREAM_<PROGRAM>_<FLAG>`) and a TOML file (`--config FILE`, keys named like the long
//! flags), then clap's own default. Command line > environment > file > default.
//!
//! It works on the clap `Command` alone, so a flag added to either program is covered
//! without code of its own: the values from the environment and the file become command-line
//! arguments put before the user's, for the flags the user did not give, and clap checks
//! them all as usual.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::error::{ContextKind, ContextValue};
use clap::parser::ValueSource;
use clap::{Arg, ArgMatches, Command};

/// The flags this module adds to both programs, which neither a file nor the environment
/// sets (except `CAPSTREAM_<PROGRAM>_CONFIG`, which names the file).
pub(super) const CONFIG: &str = "config";
pub(super) const CHECK_CONFIG: &str = "check_config";
pub(super) const GENERATE: &str = "generate";

/// `CAPSTREAM_SENSOR` for `sensor`.
pub(super) fn env_prefix(cmd: &Command) -> String {
    // capstream-extcap's are CAPSTREAM_EXTCAP_*, as sensor's are CAPSTREAM_SENSOR_*.
    let name = cmd.get_name();
    format!(
        "CAPSTREAM_{}",
        env_word(name.strip_prefix("capstream-").unwrap_or(name))
    )
}

fn env_word(name: &str) -> String {
    name.to_ascii_uppercase().replace('-', "_")
}

/// The variable that sets `--long`.
fn env_name(prefix: &str, long: &str) -> String {
    format!("{prefix}_{}", env_word(long))
}

/// The explanation appended to both programs' `--help`, with examples from its own options.
pub(super) fn help_text(cmd: &Command) -> String {
    let prefix = env_prefix(cmd);
    let first = |want: fn(&Kind) -> bool| settable(cmd).find(|(arg, _)| want(&kind(arg)));
    let mut env = Vec::new();
    let mut file = Vec::new();
    let default = |arg: &Arg| {
        let value = arg.get_default_values().first()?.to_string_lossy();
        (!value.is_empty()).then(|| value.into_owned())
    };
    let one = settable(cmd)
        .find(|(arg, _)| matches!(kind(arg), Kind::One) && default(arg).is_some())
        .or_else(|| first(|k| matches!(k, Kind::One)));
    if let Some((arg, long)) = one {
        let value = default(arg).unwrap_or_else(|| value_name(arg));
        env.push(format!("{}={value}", env_name(&prefix, long)));
        file.push(format!("`{long} = \"{value}\"`"));
    }
    if let Some((arg, long)) = first(|k| matches!(k, Kind::Many)) {
        let value = value_name(arg);
        env.push(format!("{}={value}1,{value}2", env_name(&prefix, long)));
        file.push(format!("`{long} = [\"{value}1\", \"{value}2\"]`"));
    }
    if let Some((_, long)) = first(|k| matches!(k, Kind::Switch)) {
        env.push(format!("{}=true", env_name(&prefix, long)));
        file.push(format!("`{long} = true`"));
    }
    format!(
        "Every option can also come from the environment, as {prefix}_<OPTION> (e.g. {}), \
         or from a TOML file given with --config or {prefix}_CONFIG, its keys named like the \
         long options (e.g. {}). The command line wins over the environment, the environment \
         over the file.",
        env.join(", "),
        file.join(", ")
    )
}

/// Where a flag's value came from, said with any error about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Origin {
    Env(String),
    File { path: PathBuf, key: String },
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Env(name) => write!(f, "environment variable {name}"),
            Self::File { path, key } => write!(f, "config file {}, key '{key}'", path.display()),
        }
    }
}

/// The arguments to put before the user's, and where each flag among them came from.
#[derive(Debug, Default)]
pub(super) struct Layered {
    pub args: Vec<OsString>,
    pub origins: BTreeMap<String, Origin>,
}

impl Layered {
    /// The origin of the flag an error names, e.g. `--buffer <BYTES>`.
    pub fn origin_of(&self, e: &clap::Error) -> Option<&Origin> {
        [ContextKind::InvalidArg, ContextKind::PriorArg]
            .into_iter()
            .filter_map(|kind| match e.get(kind) {
                Some(ContextValue::String(s)) => Some(vec![s.clone()]),
                Some(ContextValue::Strings(v)) => Some(v.clone()),
                _ => None,
            })
            .flatten()
            .find_map(|shown| {
                let long = shown.strip_prefix("--")?.split([' ', '=']).next()?;
                self.origins.get(long)
            })
    }
}

/// The flags a file or the environment may set: those with a long name, but not help,
/// version or this module's own.
fn settable(cmd: &Command) -> impl Iterator<Item = (&Arg, &str)> {
    cmd.get_arguments().filter_map(|arg| {
        let long = arg.get_long()?;
        let own = [CONFIG, CHECK_CONFIG, GENERATE].contains(&arg.get_id().as_str());
        let meta = matches!(
            arg.get_action(),
            clap::ArgAction::Help
                | clap::ArgAction::HelpShort
                | clap::ArgAction::HelpLong
                | clap::ArgAction::Version
        );
        (!own && !meta).then_some((arg, long))
    })
}

/// Whether `a` and `b` may not be given together: one names the other (or a group holding
/// it) in `conflicts_with`, or both belong to a group that allows one of its members.
fn conflict(cmd: &Command, a: &Arg, b: &Arg) -> bool {
    let names = |x: &Arg, y: &Arg| {
        cmd.get_arg_conflicts_with(x)
            .iter()
            .any(|c| c.get_id() == y.get_id())
    };
    let grouped = cmd.get_groups().any(|g| {
        let members: Vec<_> = g.get_args().collect();
        !g.clone().is_multiple() && members.contains(&a.get_id()) && members.contains(&b.get_id())
    });
    names(a, b) || names(b, a) || grouped
}

/// The value of each flag in the environment (`vars`: the variables of the program's
/// prefix) and the config file, turned into arguments, for the flags the command line
/// (`given`) lacks. A flag is also left out when it conflicts with one from a place that
/// wins, so that `-r FILE` on the command line overrides `iface` in the file.
pub(super) fn layer(
    cmd: &Command,
    given: &ArgMatches,
    vars: &[(String, String)],
    file: Option<&Path>,
) -> Result<Layered, String> {
    let prefix = env_prefix(cmd);
    let known: Vec<String> = settable(cmd)
        .map(|(_, long)| env_name(&prefix, long))
        .chain([env_name(&prefix, CONFIG)])
        .collect();
    if let Some((name, _)) = vars.iter().find(|(name, _)| !known.contains(name)) {
        return Err(format!(
            "unknown environment variable {name}: no option of that name (see --help)"
        ));
    }
    let table = file.map(read_table).transpose()?;
    if let (Some(path), Some(table)) = (file, &table) {
        if let Some(key) = table
            .keys()
            .find(|key| !settable(cmd).any(|(_, long)| long == key.as_str()))
        {
            return Err(format!(
                "config file {}: unknown key '{key}': keys are the long options without \
                 their dashes, e.g. `{}` (see --help)",
                path.display(),
                example_key(cmd)
            ));
        }
    }

    let mut present: Vec<&Arg> = settable(cmd)
        .filter(|(arg, _)| {
            given.value_source(arg.get_id().as_str()) == Some(ValueSource::CommandLine)
        })
        .map(|(arg, _)| arg)
        .collect();
    // Positional arguments (the sensor's trailing filter) come only from the command line.
    present.extend(
        cmd.get_positionals().filter(|arg| {
            given.value_source(arg.get_id().as_str()) == Some(ValueSource::CommandLine)
        }),
    );
    let mut out = Layered::default();

    // The environment first: what it sets wins over what conflicts with it in the file.
    let mut from_env = Vec::new();
    for (arg, long) in settable(cmd) {
        let name = env_name(&prefix, long);
        let Some((_, value)) = vars.iter().find(|(n, v)| *n == name && !v.is_empty()) else {
            continue;
        };
        if overridden(cmd, &present, arg) {
            continue;
        }
        let args =
            env_args(arg, long, value).map_err(|e| format!("environment variable {name}: {e}"))?;
        out.args.extend(args);
        out.origins.insert(long.to_string(), Origin::Env(name));
        from_env.push(arg);
    }
    present.extend(from_env);

    if let (Some(path), Some(table)) = (file, &table) {
        for (arg, long) in settable(cmd) {
            let Some(value) = table.get(long) else {
                continue;
            };
            if overridden(cmd, &present, arg) {
                continue;
            }
            let args = file_args(arg, long, value)
                .map_err(|e| format!("config file {}: key '{long}': {e}", path.display()))?;
            out.args.extend(args);
            out.origins.insert(
                long.to_string(),
                Origin::File {
                    path: path.to_path_buf(),
                    key: long.to_string(),
                },
            );
        }
    }
    Ok(out)
}

fn example_key(cmd: &Command) -> String {
    settable(cmd)
        .find(|(arg, _)| arg.get_action().takes_values())
        .map(|(arg, long)| format!("{long} = \"{}\"", value_name(arg)))
        .unwrap_or_default()
}

/// `IFACE` for `--iface IFACE`.
fn value_name(arg: &Arg) -> String {
    arg.get_value_names()
        .and_then(|names| names.first())
        .map_or("VALUE".to_string(), ToString::to_string)
}

/// Whether a place that wins already gave `arg`, or a flag it may not be given with.
fn overridden(cmd: &Command, present: &[&Arg], arg: &Arg) -> bool {
    present
        .iter()
        .any(|p| p.get_id() == arg.get_id() || conflict(cmd, p, arg))
}

fn read_table(path: &Path) -> Result<toml::Table, String> {
    let shown = path.display();
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read config file {shown}: {e}"))?;
    text.parse::<toml::Table>().map_err(|e| {
        let line = e
            .span()
            .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1);
        let what = e.message().trim().replace('\n', "; ");
        match line {
            Some(line) => format!("config file {shown}: line {line}: {what}"),
            None => format!("config file {shown}: {what}"),
        }
    })
}

/// How a flag takes its values.
enum Kind {
    /// A switch: `--zero-copy`.
    Switch,
    /// One value: `--buffer 64MiB`.
    One,
    /// Repeatable: `-i eth0 -i eth1`.
    Many,
}

fn kind(arg: &Arg) -> Kind {
    match arg.get_action() {
        a if !a.takes_values() => Kind::Switch,
        clap::ArgAction::Append => Kind::Many,
        _ => Kind::One,
    }
}

/// `--long=value`, which keeps a value that starts with `-` a value.
fn with_value(long: &str, value: &str) -> OsString {
    format!("--{long}={value}").into()
}

fn env_args(arg: &Arg, long: &str, value: &str) -> Result<Vec<OsString>, String> {
    match kind(arg) {
        Kind::Switch => match value.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Ok(vec![format!("--{long}").into()]),
            "0" | "false" | "no" | "off" => Ok(Vec::new()),
            _ => Err(format!("expected true or false, got '{value}'")),
        },
        Kind::One => Ok(vec![with_value(long, value)]),
        Kind::Many => Ok(value
            .split(',')
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(|v| with_value(long, v))
            .collect()),
    }
}

fn file_args(arg: &Arg, long: &str, value: &toml::Value) -> Result<Vec<OsString>, String> {
    let scalar = |v: &toml::Value| match v {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(n) => Some(n.to_string()),
        toml::Value::Float(x) => Some(x.to_string()),
        _ => None,
    };
    match (kind(arg), value) {
        (Kind::Switch, toml::Value::Boolean(true)) => Ok(vec![format!("--{long}").into()]),
        (Kind::Switch, toml::Value::Boolean(false)) => Ok(Vec::new()),
        (Kind::Switch, other) => Err(format!("expected true or false, got {}", type_name(other))),
        (Kind::Many, toml::Value::Array(items)) => items
            .iter()
            .map(|item| {
                scalar(item).map(|v| with_value(long, &v)).ok_or_else(|| {
                    format!(
                        "expected an array of strings, got an array holding {}",
                        type_name(item)
                    )
                })
            })
            .collect(),
        (Kind::Many, other) => scalar(other)
            .map(|v| vec![with_value(long, &v)])
            .ok_or_else(|| {
                format!(
                    "expected a string or an array of strings, got {}",
                    type_name(other)
                )
            }),
        (Kind::One, other) => scalar(other)
            .map(|v| vec![with_value(long, &v)])
            .ok_or_else(|| format!("expected a string, got {}", type_name(other))),
    }
}

fn type_name(value: &toml::Value) -> &'static str {
    match value {
        toml::Value::String(_) => "a string",
        toml::Value::Integer(_) => "an integer",
        toml::Value::Float(_) => "a float",
        toml::Value::Boolean(_) => "a boolean",
        toml::Value::Datetime(_) => "a date",
        toml::Value::Array(_) => "an array",
        toml::Value::Table(_) => "a table",
    }
}
