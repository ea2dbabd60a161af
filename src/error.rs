//! The crate's error type.

use core::fmt;

/// Why an attention call was refused.
///
/// Every variant names the argument at fault, so the message alone says what to fix.
/// No input makes flashcpu panic: everything it cannot compute is reported here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Error {
    /// A shape is inconsistent with another argument, or a dimension is out of range.
    Shape {
        /// The argument at fault (`"q"`, `"k"`, `"v"`, `"o"`, `"bias"`, `"lse"`, ...).
        arg: &'static str,
        /// What is wrong with it.
        msg: String,
    },
    /// A stride is invalid: the head-dim stride is not 1, the view reaches past the end
    /// of its buffer, an offset overflows, or output strides make two elements overlap.
    Stride {
        /// The argument at fault.
        arg: &'static str,
        /// What is wrong with it.
        msg: String,
    },
    /// A numeric parameter is NaN, infinite or otherwise out of range.
    Param {
        /// The parameter at fault (`"scale"`, `"softcap"`, `"alibi"`, `"sinks"`, `"bias"`, ...).
        arg: &'static str,
        /// What is wrong with it.
        msg: String,
    },
    /// The backend that was forced is not supported by this CPU or build.
    Backend {
        /// The name of the backend that was requested.
        requested: &'static str,
        /// What is available instead.
        msg: String,
    },
}

impl Error {
    pub(crate) fn shape(arg: &'static str, msg: impl Into<String>) -> Self {
        Error::Shape {
            arg,
            msg: msg.into(),
        }
    }
    pub(crate) fn stride(arg: &'static str, msg: impl Into<String>) -> Self {
        Error::Stride {
            arg,
            msg: msg.into(),
        }
    }
    pub(crate) fn param(arg: &'static str, msg: impl Into<String>) -> Self {
        Error::Param {
            arg,
            msg: msg.into(),
        }
    }

    /// The name of the argument or parameter this error is about.
    pub fn arg(&self) -> &'static str {
        match self {
            Error::Shape { arg, .. } | Error::Stride { arg, .. } | Error::Param { arg, .. } => arg,
            Error::Backend { .. } => "backend",
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Shape { arg, msg } => write!(f, "invalid shape for `{arg}`: {msg}"),
            Error::Stride { arg, msg } => write!(f, "invalid strides for `{arg}`: {msg}"),
            Error::Param { arg, msg } => write!(f, "invalid parameter `{arg}`: {msg}"),
            Error::Backend { requested, msg } => {
                write!(f, "invalid `backend`: {requested} is not available: {msg}")
            }
        }
    }
}

impl std::error::Error for Error {}

/// `Result` with flashcpu's [`Error`].
pub type Result<T, E = Error> = core::result::Result<T, E>;
