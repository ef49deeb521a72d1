//! A byte string that must never be printed: tokens, Vault tokens, secret values.

use std::fmt;

use zeroize::{Zeroize, ZeroizeOnDrop};

/// Secret bytes, zeroed when dropped.
///
/// `Debug` prints only the length and there is no `Display`: the bytes leave the
/// type only through [`Secret::expose_secret`], at the point of use.
#[derive(Clone, Default, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// Wraps bytes; the caller gives up its copy.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    /// The secret bytes. Use them where they are needed and nowhere else.
    pub fn expose_secret(&self) -> &[u8] {
        &self.0
    }

    /// The secret as UTF-8, or `None` when it is not valid UTF-8.
    pub fn expose_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.0).ok()
    }

    /// Whether the secret is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(value.into_bytes())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_shows_only_the_length() {
        let secret = Secret::from("hunter2".to_owned());
        assert_eq!(format!("{secret:?}"), "Secret(7 bytes)");
        assert_eq!(secret.expose_str(), Some("hunter2"));
    }
}
