//! How both programs end: 0 on success; otherwise the one line `PROGRAM: error: …` on
//! standard error and 2 when what the user asked for cannot be done (bad input), 1 when
//! the run failed.

use std::fmt::Display;
use std::process::ExitCode;

/// What kind of failure ended a program, which decides its exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The user asked for something impossible (a bad option, an unreadable file): exit 2.
    BadInput,
    /// Something failed while running: exit 1.
    RunFailed,
}

impl Failure {
    /// The process exit code.
    pub fn code(self) -> u8 {
        match self {
            Self::BadInput => 2,
            Self::RunFailed => 1,
        }
    }
}

/// Prints `program: error: error` and returns the exit code of `failure`.
pub fn fail(program: &str, failure: Failure, error: impl Display) -> ExitCode {
    eprintln!("{program}: error: {error}");
    ExitCode::from(failure.code())
}

/// 0 for `Ok`; for an error, its one line and the exit code `failure` gives it.
pub fn finish<E: Display>(
    program: &str,
    result: Result<(), E>,
    failure: impl FnOnce(&E) -> Failure,
) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(program, failure(&e), e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_input_is_2_and_a_failed_run_1() {
        assert_eq!(Failure::BadInput.code(), 2);
        assert_eq!(Failure::RunFailed.code(), 1);
        assert_eq!(
            finish("test", Ok::<(), &str>(()), |_| Failure::BadInput),
            ExitCode::SUCCESS
        );
        assert_eq!(
            finish("test", Err("no"), |_| Failure::BadInput),
            ExitCode::from(2)
        );
    }
}
