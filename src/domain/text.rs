//! Validated free text: chat messages and GM display names.
//!
//! Legacy clients send a chat message as standard padded base64 of its UTF-8 text. The relay
//! carries the decoded text (events hold UTF-8, not base64) and re-encodes it for legacy
//! pollers; accepting only strict, canonical base64 is what makes that round trip give back
//! exactly the text that was sent.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

/// The original system's `MSG_MAX_LEN`, counted in code points of the decoded text.
pub const MSG_MAX_CHARS: usize = 500;

/// A GM name is shown in game clients next to chat lines; 64 characters is the contract.
pub const GM_NAME_MAX_CHARS: usize = 64;

/// Base64 of 500 four-byte code points: longer input cannot decode to a valid message, so
/// it is refused before decoding.
const MSG_MAX_BASE64_LEN: usize = (MSG_MAX_CHARS * 4).div_ceil(3) * 4;

/// One chat message's text, valid by construction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatText(String);

impl ChatText {
    /// Decodes a legacy `msg` parameter: non-empty, strict padded standard base64, UTF-8,
    /// at most [`MSG_MAX_CHARS`] code points.
    pub fn from_base64(msg: &[u8]) -> Option<Self> {
        if msg.is_empty() || msg.len() > MSG_MAX_BASE64_LEN {
            return None;
        }
        let bytes = STANDARD.decode(msg).ok()?;
        Self::new(String::from_utf8(bytes).ok()?)
    }

    /// Accepts text already decoded (native interface): non-empty, at most
    /// [`MSG_MAX_CHARS`] code points.
    pub fn new(text: String) -> Option<Self> {
        let chars = text.chars().count();
        (chars > 0 && chars <= MSG_MAX_CHARS).then_some(Self(text))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The legacy wire form: standard padded base64 of the UTF-8 text.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0.as_bytes())
    }
}

/// Base64 of already-validated event text, for legacy replies.
pub fn encode_base64(text: &str) -> String {
    STANDARD.encode(text.as_bytes())
}

/// A GM's display name: non-empty UTF-8, at most [`GM_NAME_MAX_CHARS`] characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GmName(String);

impl GmName {
    pub fn parse(raw: &[u8]) -> Option<Self> {
        let s = std::str::from_utf8(raw).ok()?;
        let chars = s.chars().count();
        (chars > 0 && chars <= GM_NAME_MAX_CHARS).then(|| Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msg_round_trips_exactly() {
        for text in ["hi", "你好，玩家", "a+b/c", "😀"] {
            let b64 = STANDARD.encode(text);
            let msg = ChatText::from_base64(b64.as_bytes()).expect(text);
            assert_eq!(msg.as_str(), text);
            assert_eq!(msg.to_base64(), b64);
        }
    }

    #[test]
    fn msg_rejects_bad_input() {
        let too_long = STANDARD.encode("x".repeat(MSG_MAX_CHARS + 1));
        let max = STANDARD.encode("中".repeat(MSG_MAX_CHARS));
        assert!(ChatText::from_base64(max.as_bytes()).is_some());
        for bad in [
            "",
            "aGk",    // unpadded
            "aGk=\n", // trailing junk
            "aGl=",   // non-canonical trailing bits
            "aG k=",  // space (a raw `+` decoded as form data)
            "_-8=",   // url-safe alphabet
            "/w==",   // valid base64 of a non-UTF-8 byte
            too_long.as_str(),
        ] {
            assert!(ChatText::from_base64(bad.as_bytes()).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn gm_name_rules() {
        assert!(GmName::parse("客服小王".as_bytes()).is_some());
        assert!(GmName::parse("x".repeat(64).as_bytes()).is_some());
        assert!(GmName::parse("x".repeat(65).as_bytes()).is_none());
        assert!(GmName::parse(b"").is_none());
        assert!(GmName::parse(b"\xff").is_none());
    }
}
