//! The sensor's two kinds of failure, which decide the exit code (through
//! [`program::exit`]). Where something else is decided on an error, the error is typed
//! where it is decided: the sensor's `transport::ConnectError` (retry, or stop the first
//! connection), the `errno` of a system call in the capture backends (whether to name the
//! missing privileges); nothing decides on an error's text.

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

    /// Which exit code the error ends the sensor with.
    pub fn failure(&self) -> program::exit::Failure {
        match self {
            Self::Input(_) => program::exit::Failure::BadInput,
            Self::Runtime(_) => program::exit::Failure::RunFailed,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
