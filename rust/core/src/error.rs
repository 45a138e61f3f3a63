//! The one error type of the core. Every fallible public function returns [`Result`]; the binding layer maps each
//! variant onto one Python exception class, so the variant is the contract and the message is for the person.

use std::path::PathBuf;

/// Everything the core can reject. Messages name the offending thing and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An array with the wrong number of dimensions or shapes that do not fit together.
    #[error("{0}")]
    Shape(String),
    /// An element type the operation does not support.
    #[error("{0}")]
    Dtype(String),
    /// NaN or infinity in an input.
    #[error("{0}")]
    NonFinite(String),
    /// No data where some is needed (zero tokens, an empty score list, a covariance of nothing).
    #[error("{0}")]
    Empty(String),
    /// A requested rank the matrix cannot have (zero, or above `min(rows, cols)`).
    #[error("{0}")]
    Rank(String),
    /// Allocation constraints that no integer assignment satisfies.
    #[error("{0}")]
    Infeasible(String),
    /// Any other argument outside its domain (negative score, unknown centring mode, zero dimension).
    #[error("{0}")]
    Value(String),
    /// A corrupt, truncated or inconsistent adapter file.
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
    /// An allocation the machine (or an address-space limit) refused. The core never aborts on one: every buffer
    /// sized from an input or a file is allocated fallibly.
    #[error("{0}")]
    OutOfMemory(String),
    /// The caller's interrupt check asked a long computation to stop; nothing the call would change was changed.
    #[error("interrupted")]
    Interrupted,
    /// The operating system refused a read or write.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }

    pub(crate) fn format(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Format { path: path.into(), message: message.into() }
    }
}
