//! The one error type: a message for stderr and the exit code it maps to.

use std::fmt;
use std::io;
use std::path::Path;

/// Exit code for bad input (flags, data, a checkpoint from other flags): a user error
/// that a retry cannot fix. clap exits with the same code on bad flags.
pub const EXIT_INPUT: u8 = 2;
/// Exit code for I/O failures (disk full, permissions): possibly transient.
pub const EXIT_IO: u8 = 1;

#[derive(Debug)]
pub struct Error {
    pub code: u8,
    pub message: String,
}

impl Error {
    /// Bad input: exit code 2.
    pub fn input(message: impl Into<String>) -> Self {
        Error {
            code: EXIT_INPUT,
            message: message.into(),
        }
    }

    /// An I/O failure on `path` while doing `what`: exit code 1.
    pub fn io(what: &str, path: &Path, err: &io::Error) -> Self {
        Error {
            code: EXIT_IO,
            message: format!("{what} {}: {err}", path.display()),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}
