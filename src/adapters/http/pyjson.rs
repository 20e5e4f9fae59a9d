//! JSON written exactly as Python 2's `json.dumps(value)` writes it.
//!
//! Legacy GM clients and game servers were built against a Python 2 app and some of them
//! compare replies textually (or parse them with code that only ever saw Python's output),
//! both in the outer reply and in the JSON hidden inside the base64 `data` fields. So the
//! relay reproduces Python's default layout instead of `serde_json`'s compact one:
//!
//! - separators `", "` between items and `": "` between a key and its value, no other
//!   whitespace; empty containers are `[]` and `{}`;
//! - ASCII only (`ensure_ascii=True`), because the reply's `Content-Type: text/html` has no
//!   charset and the original never sent a non-ASCII byte: `"` and `\` are
//!   backslash-escaped, `\n` `\r` `\t` `\b` `\f` use their short escapes, every other char
//!   outside `0x20..=0x7E` (other control chars, DEL, all non-ASCII) is `\uXXXX` with
//!   lowercase hex, and a char beyond the BMP is a UTF-16 surrogate pair;
//! - `/` is not escaped.
//!
//! Integers, `true`, `false` and `null` are written as `serde_json` writes them, which is
//! what Python writes too. Floats are not guaranteed to match (Python writes `1e+16` and
//! `NaN` where `serde_json` writes `1e16` and `null`); no legacy reply carries one.
//! Key order is whatever the value's `Serialize` gives: Python's dict order was arbitrary
//! and clients parse the JSON, so no order is expected.

use std::io;

use serde::Serialize;
use serde_json::ser::{CharEscape, Formatter};

/// A [`Formatter`] producing Python 2 `json.dumps` output; see the module docs.
///
/// Use it through [`to_vec`] / [`to_string`], or with
/// `serde_json::Serializer::with_formatter` to write into another buffer.
#[derive(Debug, Clone, Copy, Default)]
pub struct PythonFormatter;

impl Formatter for PythonFormatter {
    fn begin_array_value<W>(&mut self, writer: &mut W, first: bool) -> io::Result<()>
    where
        W: ?Sized + io::Write,
    {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_key<W>(&mut self, writer: &mut W, first: bool) -> io::Result<()>
    where
        W: ?Sized + io::Write,
    {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_value<W>(&mut self, writer: &mut W) -> io::Result<()>
    where
        W: ?Sized + io::Write,
    {
        writer.write_all(b": ")
    }

    // serde_json only escapes `"`, `\` and control chars itself and hands everything else
    // (DEL, non-ASCII) over as a fragment; escaping every char outside printable ASCII
    // here keeps the output right whichever way serde_json splits a string.
    fn write_string_fragment<W>(&mut self, writer: &mut W, fragment: &str) -> io::Result<()>
    where
        W: ?Sized + io::Write,
    {
        write_escaped(writer, fragment, needs_string_escape)
    }

    fn write_char_escape<W>(&mut self, writer: &mut W, char_escape: CharEscape) -> io::Result<()>
    where
        W: ?Sized + io::Write,
    {
        let c = match char_escape {
            CharEscape::Quote => '"',
            CharEscape::ReverseSolidus => '\\',
            // Python never escapes `/`, and an unescaped `/` is valid JSON.
            CharEscape::Solidus => return writer.write_all(b"/"),
            CharEscape::Backspace => '\u{8}',
            CharEscape::FormFeed => '\u{c}',
            CharEscape::LineFeed => '\n',
            CharEscape::CarriageReturn => '\r',
            CharEscape::Tab => '\t',
            CharEscape::AsciiControl(byte) => char::from(byte),
        };
        write_char_escape(writer, c)
    }

    // A pre-rendered fragment (serde_json's `RawValue`) keeps its own layout, but may hold
    // non-ASCII chars; outside strings JSON allows none, inside strings escaping them keeps
    // the meaning, so escaping them everywhere keeps the output ASCII-only.
    fn write_raw_fragment<W>(&mut self, writer: &mut W, fragment: &str) -> io::Result<()>
    where
        W: ?Sized + io::Write,
    {
        write_escaped(writer, fragment, |c| !c.is_ascii() || c == '\u{7f}')
    }
}

/// Serializes `value` as Python 2 `json.dumps(value)` would.
///
/// # Errors
///
/// Only when the value cannot be JSON at all: its `Serialize` impl fails, or a map has
/// keys that are neither strings, integers, chars nor bools. The maps, sequences, strings
/// and integers of legacy replies never fail.
pub fn to_vec<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, serde_json::Error> {
    let mut out = Vec::with_capacity(128);
    let mut serializer = serde_json::Serializer::with_formatter(&mut out, PythonFormatter);
    value.serialize(&mut serializer)?;
    Ok(out)
}

/// [`to_vec`] as a `String` (the output is ASCII, so always valid UTF-8).
///
/// # Errors
///
/// As [`to_vec`].
pub fn to_string<T: Serialize + ?Sized>(value: &T) -> Result<String, serde_json::Error> {
    let bytes = to_vec(value)?;
    String::from_utf8(bytes).map_err(serde::ser::Error::custom)
}

/// Python's `ESCAPE_ASCII` pattern `([\\"]|[^\ -~])`.
fn needs_string_escape(c: char) -> bool {
    !matches!(c, ' '..='~') || c == '"' || c == '\\'
}

/// Writes `s`, passing runs of chars that need no escape through in one write.
fn write_escaped<W>(writer: &mut W, s: &str, needs_escape: impl Fn(char) -> bool) -> io::Result<()>
where
    W: ?Sized + io::Write,
{
    let mut run_start = 0;
    for (i, c) in s.char_indices() {
        if !needs_escape(c) {
            continue;
        }
        writer.write_all(&s.as_bytes()[run_start..i])?;
        write_char_escape(writer, c)?;
        run_start = i + c.len_utf8();
    }
    writer.write_all(&s.as_bytes()[run_start..])
}

/// Python's `ESCAPE_DCT` short escapes, else `\uXXXX` per UTF-16 unit.
fn write_char_escape<W>(writer: &mut W, c: char) -> io::Result<()>
where
    W: ?Sized + io::Write,
{
    let short: &[u8] = match c {
        '"' => b"\\\"",
        '\\' => b"\\\\",
        '\n' => b"\\n",
        '\r' => b"\\r",
        '\t' => b"\\t",
        '\u{8}' => b"\\b",
        '\u{c}' => b"\\f",
        _ => {
            let mut units = [0u16; 2];
            for &unit in c.encode_utf16(&mut units).iter() {
                write_unicode_escape(writer, unit)?;
            }
            return Ok(());
        }
    };
    writer.write_all(short)
}

fn write_unicode_escape<W>(writer: &mut W, unit: u16) -> io::Result<()>
where
    W: ?Sized + io::Write,
{
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let nibble = |shift: u32| HEX[usize::from((unit >> shift) & 0xf)];
    writer.write_all(&[b'\\', b'u', nibble(12), nibble(8), nibble(4), nibble(0)])
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::Serialize;

    use super::*;

    // Expected strings below are `json.dumps(...)` output of Python 2.7.18.

    fn dumps<T: Serialize + ?Sized>(value: &T) -> String {
        to_string(value).expect("serializable")
    }

    #[derive(Serialize)]
    struct Reply<'a> {
        res: i32,
        #[serde(skip_serializing_if = "Option::is_none")]
        errno: Option<i32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        data: Option<&'a str>,
    }

    #[derive(Serialize)]
    struct Message<'a> {
        uid: &'a str,
        msg: &'a str,
    }

    #[test]
    fn reply_with_data() {
        let reply = Reply { res: 1, errno: None, data: Some("eyJ9") };
        assert_eq!(dumps(&reply), r#"{"res": 1, "data": "eyJ9"}"#);
    }

    #[test]
    fn error_reply_with_negative_errno() {
        let reply = Reply { res: 0, errno: Some(-1), data: None };
        assert_eq!(dumps(&reply), r#"{"res": 0, "errno": -1}"#);
    }

    #[test]
    fn single_key_object() {
        let reply = Reply { res: 1, errno: None, data: None };
        assert_eq!(dumps(&reply), r#"{"res": 1}"#);
    }

    #[test]
    fn nested_dict_of_arrays() {
        let mut map = BTreeMap::new();
        map.insert("a", vec![1, 2]);
        map.insert("b", vec![]);
        map.insert("c", vec![3]);
        assert_eq!(dumps(&map), r#"{"a": [1, 2], "b": [], "c": [3]}"#);
    }

    #[test]
    fn mixed_nesting() {
        let value = serde_json::json!({"a": 1, "b": [1, 2], "c": {"d": [], "e": {}}});
        assert_eq!(dumps(&value), r#"{"a": 1, "b": [1, 2], "c": {"d": [], "e": {}}}"#);
    }

    #[test]
    fn gm_receive_payload() {
        let mut map = BTreeMap::new();
        map.insert(
            "7",
            vec![Message { uid: "1001", msg: "YQ==,Yg==" }, Message { uid: "1002", msg: "Yw==" }],
        );
        assert_eq!(
            dumps(&map),
            r#"{"7": [{"uid": "1001", "msg": "YQ==,Yg=="}, {"uid": "1002", "msg": "Yw=="}]}"#
        );
    }

    #[test]
    fn apply_data_with_chinese_name() {
        let mut map = BTreeMap::new();
        map.insert("7", ["3", "张三"]);
        assert_eq!(dumps(&map), r#"{"7": ["3", "\u5f20\u4e09"]}"#);
    }

    #[test]
    fn integer_keys_are_quoted() {
        let mut map = BTreeMap::new();
        map.insert(7_i64, ["3", "张三"]);
        assert_eq!(dumps(&map), r#"{"7": ["3", "\u5f20\u4e09"]}"#);
    }

    #[test]
    fn non_ascii_keys_are_escaped() {
        let mut map = BTreeMap::new();
        map.insert("张", 1);
        assert_eq!(dumps(&map), r#"{"\u5f20": 1}"#);
    }

    #[test]
    fn emoji_is_a_surrogate_pair() {
        assert_eq!(dumps("😀"), r#""\ud83d\ude00""#);
        assert_eq!(dumps("a😀b"), r#""a\ud83d\ude00b""#);
    }

    #[test]
    fn bmp_and_astral_edges() {
        let value = ["\u{80}\u{7ff}\u{800}\u{d7ff}\u{e000}\u{fffd}", "\u{10000}"];
        assert_eq!(dumps(&value), r#"["\u0080\u07ff\u0800\ud7ff\ue000\ufffd", "\ud800\udc00"]"#);
        assert_eq!(dumps("\u{10ffff}"), r#""\udbff\udfff""#);
        assert_eq!(dumps("\u{e9}\u{ff}\u{100}\u{ffff}\u{20ac}"), r#""\u00e9\u00ff\u0100\uffff\u20ac""#);
        assert_eq!(dumps("\u{2028}\u{2029}"), r#""\u2028\u2029""#);
    }

    #[test]
    fn control_chars_and_del() {
        assert_eq!(dumps("a\u{1}b\u{7f}c\u{1f}"), r#""a\u0001b\u007fc\u001f""#);
        assert_eq!(dumps("\n\r\t\u{8}\u{c}\u{b}\u{0}"), r#""\n\r\t\b\f\u000b\u0000""#);
    }

    #[test]
    fn quotes_backslashes_and_solidus() {
        assert_eq!(dumps("q\"b\\s/"), r#""q\"b\\s/""#);
    }

    #[test]
    fn every_ascii_char() {
        let all: String = (0u8..0x80).map(char::from).collect();
        let expected = concat!(
            r#""\u0000\u0001\u0002\u0003\u0004\u0005\u0006\u0007\b\t\n\u000b\f\r\u000e\u000f"#,
            r#"\u0010\u0011\u0012\u0013\u0014\u0015\u0016\u0017\u0018\u0019\u001a\u001b"#,
            r##"\u001c\u001d\u001e\u001f !\"#$%&'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQ"##,
            r#"RSTUVWXYZ[\\]^_`abcdefghijklmnopqrstuvwxyz{|}~\u007f""#,
        );
        assert_eq!(dumps(&all), expected);
    }

    #[test]
    fn empty_containers() {
        assert_eq!(dumps(&Vec::<String>::new()), "[]");
        assert_eq!(dumps(&BTreeMap::<String, i32>::new()), "{}");
        assert_eq!(dumps(&serde_json::json!([[], {}])), "[[], {}]");
        assert_eq!(dumps(&serde_json::json!({"a": {}, "b": []})), r#"{"a": {}, "b": []}"#);
        assert_eq!(dumps(""), r#""""#);
    }

    #[test]
    fn scalars() {
        assert_eq!(dumps(&i64::MIN), "-9223372036854775808");
        assert_eq!(dumps(&u64::MAX), "18446744073709551615");
        assert_eq!(dumps(&0), "0");
        assert_eq!(dumps(&true), "true");
        assert_eq!(dumps(&()), "null");
        assert_eq!(dumps(&(true, false, None::<i32>)), "[true, false, null]");
        assert_eq!(dumps(&'张'), r#""\u5f20""#);
    }

    #[test]
    fn base64_data_is_untouched() {
        let b64 = "eyI3IjogWyIzIiwgIlx1NWYyMFx1NGUwOSJdfQ==+/";
        assert_eq!(dumps(&[b64]), format!(r#"["{b64}"]"#));
    }

    #[test]
    fn to_vec_matches_to_string() {
        let value = serde_json::json!({"res": 1, "data": "张三"});
        assert_eq!(to_vec(&value).unwrap(), dumps(&value).into_bytes());
    }

    #[test]
    fn non_string_keys_are_an_error() {
        let mut map = BTreeMap::new();
        map.insert(vec![1], 1);
        assert!(to_vec(&map).is_err());
    }

    #[test]
    fn every_char_round_trips_as_ascii() {
        let all: String = (0..=u32::from(char::MAX)).filter_map(char::from_u32).collect();
        let out = dumps(&all);
        assert!(out.bytes().all(|b| (0x20..=0x7e).contains(&b)));
        let back: String = serde_json::from_str(&out).unwrap();
        assert_eq!(back, all);
    }

    #[test]
    fn printable_ascii_is_never_escaped_except_quote_and_backslash() {
        for b in 0x20u8..=0x7e {
            let c = char::from(b);
            let expected = match c {
                '"' => r#""\"""#.to_owned(),
                '\\' => r#""\\""#.to_owned(),
                _ => format!("\"{c}\""),
            };
            assert_eq!(dumps(&c), expected);
        }
    }

    #[test]
    fn raw_fragments_are_kept_ascii() {
        let mut out = Vec::new();
        PythonFormatter.write_raw_fragment(&mut out, "{\"k\":\"张😀\u{7f}\"}").unwrap();
        assert_eq!(out, br#"{"k":"\u5f20\ud83d\ude00\u007f"}"#);
    }

    #[test]
    fn solidus_escape_is_written_plain() {
        let mut out = Vec::new();
        PythonFormatter.write_char_escape(&mut out, CharEscape::Solidus).unwrap();
        assert_eq!(out, b"/");
    }

    #[test]
    fn formatter_writes_into_any_serializer() {
        let mut out = b"prefix ".to_vec();
        let mut serializer = serde_json::Serializer::with_formatter(&mut out, PythonFormatter);
        serde_json::json!([1, "é"]).serialize(&mut serializer).unwrap();
        assert_eq!(out, br#"prefix [1, "\u00e9"]"#);
    }
}
