//! Identifiers of GMs, hosts (game servers) and players.
//!
//! Every id crosses HTTP, NATS subjects and JSON as a canonical decimal string: `0` or
//! `-?[1-9][0-9]*`, fitting in an `i64`. Accepting only that one spelling means `"007"` and
//! `"7"` cannot become two players, and no id can ever be a NATS wildcard (`*`, `>`) or
//! carry a `.` that would add a subject token.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest canonical i64: `-9223372036854775808` is 20 bytes. Anything longer is rejected
/// before any arithmetic.
const MAX_ID_LEN: usize = 20;

/// Parses a canonical decimal i64; `None` for every other spelling.
pub fn parse_canonical(s: &[u8]) -> Option<i64> {
    if s.is_empty() || s.len() > MAX_ID_LEN {
        return None;
    }
    let digits = s.strip_prefix(b"-").unwrap_or(s);
    let canonical = match digits {
        [b'0'] => s.len() == 1, // "-0" is not canonical
        [b'1'..=b'9', rest @ ..] => rest.iter().all(u8::is_ascii_digit),
        _ => false,
    };
    if !canonical {
        return None;
    }
    std::str::from_utf8(s).ok()?.parse::<i64>().ok()
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub i64);

        impl $name {
            /// Parses the canonical decimal spelling; `None` for anything else.
            pub fn parse(s: &[u8]) -> Option<Self> {
                parse_canonical(s).map(Self)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        impl FromStr for $name {
            type Err = InvalidId;
            fn from_str(s: &str) -> Result<Self, InvalidId> {
                Self::parse(s.as_bytes()).ok_or(InvalidId)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

id_type!(
    /// A GM (customer-service) account.
    GmId
);
id_type!(
    /// A game server ("hostnum" in the original system).
    HostId
);
id_type!(
    /// A player.
    Uid
);

/// The text was not a canonical decimal i64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("id is not a canonical decimal integer")]
pub struct InvalidId;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_canonical_spellings_only() {
        for ok in ["0", "7", "-7", "1001", "9223372036854775807", "-9223372036854775808"] {
            assert_eq!(parse_canonical(ok.as_bytes()).map(|v| v.to_string()), Some(ok.into()));
        }
        for bad in [
            "",
            "-",
            "-0",
            "007",
            "+5",
            " 5",
            "5 ",
            "1.0",
            "1e3",
            "*",
            ">",
            "a.b",
            "0x10",
            "9223372036854775808",
            "-9223372036854775809",
            "123456789012345678901234567890",
            "١٢",
            "5\0",
        ] {
            assert_eq!(parse_canonical(bad.as_bytes()), None, "{bad:?}");
        }
    }

    #[test]
    fn ids_travel_as_strings_in_json() {
        let uid: Uid = serde_json::from_str("\"42\"").unwrap();
        assert_eq!(uid, Uid(42));
        assert_eq!(serde_json::to_string(&uid).unwrap(), "\"42\"");
        assert!(serde_json::from_str::<Uid>("\"042\"").is_err());
    }
}
