//! The sensor's two kinds of failure, which decide the exit code.

/// A fatal error, shown as the one line `sensor: error: <message>`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The user asked for something impossible: bad filter, unknown interface, unreadable
    /// file, bad CA file. Exit code 2.
    #[error("{0}")]
    Input(String),
    /// Something failed while running: receiver unreachable, TLS refused, receiver error,
    /// capture failure. Exit code 1.
    #[error("{0}")]
    Runtime(String),
}

impl Error {
    pub fn input(msg: impl Into<String>) -> Self {
        Self::Input(msg.into())
    }

    pub fn runtime(msg: impl Into<String>) -> Self {
        Self::Runtime(msg.into())
    }

    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Input(_) => 2,
            Self::Runtime(_) => 1,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
