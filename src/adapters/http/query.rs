//! Query-string parsing for the legacy `GET /gm?action=...` and `GET /gs?action=...`
//! endpoints.
//!
//! Deployed GM clients and game servers were written against a Python 2 uwsgi app, so
//! they encode parameters the way that app decoded them, not the way a modern framework
//! does. Decoding them any other way changes what a GM or player sees: a base64 `msg`
//! loses its `+` signs, a Chinese `gm_name` turns into mojibake. This module reproduces
//! the original's decoding byte for byte:
//!
//! - the query is split on `&` into pieces, each piece on its first `=`;
//! - keys and values are form-decoded (`+` is a space, `%XX` is a byte, any other `%` is
//!   kept literally, as Python's `unquote` does);
//! - the first value of a repeated key wins;
//! - `msg` and `gm_name` are percent-decoded once more by the original (`urllib.unquote`),
//!   which [`LegacyQuery::get_unquoted`] provides.
//!
//! Values are bytes, not strings: `%ff` is a valid query but not UTF-8, and whether that is
//! an error (and which errno) depends on the parameter, so the callers decide.

/// Pairs kept from one query string.
///
/// The HTTP adapter refuses queries over 12 KiB, which cannot hold more than ~6,000 pairs,
/// so within that limit every pair is kept, as the original kept them (a request may carry
/// junk parameters before `action`). The bound only matters to other callers: past it,
/// pieces are ignored, which bounds the work and memory one query can cost.
pub const MAX_QUERY_PAIRS: usize = 8192;

/// A decoded legacy query string.
///
/// All keys and values live in one buffer, so parsing costs two allocations however many
/// pairs the query holds.
#[derive(Debug, Clone, Default)]
pub struct LegacyQuery {
    /// Decoded bytes: each pair's key immediately followed by its value.
    buf: Vec<u8>,
    /// Per pair, in query order: key start, key end (= value start), value end in `buf`.
    pairs: Vec<(usize, usize, usize)>,
}

impl LegacyQuery {
    /// Parses `raw`, everything after the `?` of the request target (possibly empty).
    ///
    /// Never fails: like the original, malformed pieces are skipped or kept literally.
    pub fn parse(raw: &[u8]) -> LegacyQuery {
        // Decoding never makes a piece longer, so this is the only growth of `buf`.
        let mut buf = Vec::with_capacity(raw.len());
        let mut pairs = Vec::new();

        for piece in raw.split(|&b| b == b'&') {
            if pairs.len() == MAX_QUERY_PAIRS {
                break;
            }
            // The original kept blank values (it saw an empty `msg`), and then Python's
            // parse_qsl reads a bare `key` as `key=`; an empty piece is skipped.
            if piece.is_empty() {
                continue;
            }
            let (key, value) = match piece.iter().position(|&b| b == b'=') {
                Some(eq) => (&piece[..eq], &piece[eq + 1..]),
                None => (piece, &[][..]),
            };
            // No parameter has an empty name, so such a pair can only be junk.
            if key.is_empty() {
                continue;
            }
            let start = buf.len();
            decode_into(key, true, &mut buf);
            let split = buf.len();
            decode_into(value, true, &mut buf);
            pairs.push((start, split, buf.len()));
        }

        LegacyQuery { buf, pairs }
    }

    /// Form-decoded value (bytes) of `key`, `None` when absent.
    ///
    /// A key given as `key=` is present with an empty value, so callers can tell "sent
    /// empty" (for `msg`: errno 6) from "not sent" (errno -1).
    pub fn get(&self, key: &str) -> Option<&[u8]> {
        let key = key.as_bytes();
        self.pairs
            .iter()
            .find(|&&(start, split, _)| &self.buf[start..split] == key)
            .map(|&(_, split, end)| &self.buf[split..end])
    }

    /// [`get`](Self::get), then percent-decoded once more like Python 2's
    /// `urllib.unquote` (`%XX` only; `+` stays `+`).
    ///
    /// The original did this to `msg` and `gm_name`, which is why GM clients send a base64
    /// `+` as `%2B` or `%252B` and both arrive as `+`.
    pub fn get_unquoted(&self, key: &str) -> Option<Vec<u8>> {
        self.get(key).map(unquote)
    }
}

/// Python 2 `urllib.unquote`: `%XX` (either case) becomes that byte; a `%` not followed by
/// two hex digits is kept literally; `+` is left alone.
pub fn unquote(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    decode_into(bytes, false, &mut out);
    out
}

/// Python 2 `urllib.unquote_plus`: `+` becomes a space, then as [`unquote`].
///
/// A `+` produced by `%2B` stays a `+`, because the spaces are substituted before the
/// percent escapes are decoded.
pub fn unquote_plus(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    decode_into(bytes, true, &mut out);
    out
}

/// Single pass equivalent to Python's `unquote(s.replace('+', ' '))` when `plus_is_space`:
/// a space is not a hex digit, so substituting it first cannot create or break an escape.
fn decode_into(src: &[u8], plus_is_space: bool, out: &mut Vec<u8>) {
    let mut i = 0;
    while i < src.len() {
        match src[i] {
            b'%' => {
                if let Some(byte) = hex_pair(src.get(i + 1..i + 3)) {
                    out.push(byte);
                    i += 3;
                    continue;
                }
                out.push(b'%');
            }
            b'+' if plus_is_space => out.push(b' '),
            other => out.push(other),
        }
        i += 1;
    }
}

fn hex_pair(pair: Option<&[u8]>) -> Option<u8> {
    match pair? {
        &[hi, lo] => Some(hex_digit(hi)? << 4 | hex_digit(lo)?),
        _ => None,
    }
}

fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(raw: &str) -> LegacyQuery {
        LegacyQuery::parse(raw.as_bytes())
    }

    #[test]
    fn plain_pairs() {
        let query = q("action=add&gm_account=7&host=3&uid=1001");
        assert_eq!(query.get("action"), Some(&b"add"[..]));
        assert_eq!(query.get("gm_account"), Some(&b"7"[..]));
        assert_eq!(query.get("host"), Some(&b"3"[..]));
        assert_eq!(query.get("uid"), Some(&b"1001"[..]));
        assert_eq!(query.get("msg"), None);
    }

    #[test]
    fn empty_query_has_nothing() {
        let query = q("");
        assert_eq!(query.get("action"), None);
        assert_eq!(query.get(""), None);
        assert_eq!(query.get_unquoted("msg"), None);
    }

    #[test]
    fn only_separators_have_nothing() {
        let query = q("&&&");
        assert_eq!(query.get(""), None);
        assert_eq!(query.get("action"), None);
    }

    // A base64 `+` as it travels: raw it is a space, `%2B` and `%252B` both end up `+`
    // after the second decode the original applied to `msg`.
    #[test]
    fn base64_plus_raw_is_a_space() {
        let query = q("msg=ab+c");
        assert_eq!(query.get("msg"), Some(&b"ab c"[..]));
        assert_eq!(query.get_unquoted("msg"), Some(b"ab c".to_vec()));
    }

    #[test]
    fn base64_plus_encoded_once() {
        let query = q("msg=ab%2Bc%3D");
        assert_eq!(query.get("msg"), Some(&b"ab+c="[..]));
        assert_eq!(query.get_unquoted("msg"), Some(b"ab+c=".to_vec()));
    }

    #[test]
    fn base64_plus_encoded_twice() {
        let query = q("msg=ab%252Bc%253D");
        assert_eq!(query.get("msg"), Some(&b"ab%2Bc%3D"[..]));
        assert_eq!(query.get_unquoted("msg"), Some(b"ab+c=".to_vec()));
    }

    #[test]
    fn second_decode_leaves_plus_alone() {
        // `%2B` decodes to `+` in the form pass; the unquote pass must not turn it into a
        // space.
        let query = q("msg=a%2B%2Bb");
        assert_eq!(query.get_unquoted("msg"), Some(b"a++b".to_vec()));
    }

    #[test]
    fn first_value_of_a_repeated_key_wins() {
        let query = q("uid=1&uid=2&action=send&uid=3");
        assert_eq!(query.get("uid"), Some(&b"1"[..]));
        assert_eq!(query.get("action"), Some(&b"send"[..]));
    }

    #[test]
    fn first_value_wins_even_when_empty() {
        let query = q("msg=&msg=abc");
        assert_eq!(query.get("msg"), Some(&b""[..]));
    }

    #[test]
    fn piece_without_equals_is_a_blank_value() {
        let query = q("action=create&gm_account&gm_name=x");
        assert_eq!(query.get("gm_account"), Some(&b""[..]));
        assert_eq!(query.get("action"), Some(&b"create"[..]));
        assert_eq!(query.get("gm_name"), Some(&b"x"[..]));
    }

    #[test]
    fn bare_key_is_the_first_value() {
        let query = q("uid&uid=5");
        assert_eq!(query.get("uid"), Some(&b""[..]));
    }

    #[test]
    fn empty_value_is_present() {
        let query = q("action=send&msg=&uid=1");
        assert_eq!(query.get("msg"), Some(&b""[..]));
        assert_eq!(query.get_unquoted("msg"), Some(Vec::new()));
        assert_eq!(query.get("uid"), Some(&b"1"[..]));
    }

    #[test]
    fn empty_key_is_ignored() {
        let query = q("=x&a=1");
        assert_eq!(query.get(""), None);
        assert_eq!(query.get("a"), Some(&b"1"[..]));
    }

    #[test]
    fn only_the_first_equals_splits() {
        let query = q("msg=YQ==&x==");
        assert_eq!(query.get("msg"), Some(&b"YQ=="[..]));
        assert_eq!(query.get("x"), Some(&b"="[..]));
    }

    #[test]
    fn semicolon_is_not_a_separator() {
        let query = q("a=1;b=2");
        assert_eq!(query.get("a"), Some(&b"1;b=2"[..]));
        assert_eq!(query.get("b"), None);
    }

    #[test]
    fn keys_are_decoded_too() {
        let query = q("gm%5Fname=x&a+b=1&%61ction=add");
        assert_eq!(query.get("gm_name"), Some(&b"x"[..]));
        assert_eq!(query.get("a b"), Some(&b"1"[..]));
        assert_eq!(query.get("action"), Some(&b"add"[..]));
    }

    #[test]
    fn keys_are_case_sensitive() {
        let query = q("Action=add");
        assert_eq!(query.get("action"), None);
        assert_eq!(query.get("Action"), Some(&b"add"[..]));
    }

    #[test]
    fn hex_digits_in_either_case() {
        let query = q("a=%2b%2B%e5%E5");
        assert_eq!(query.get("a"), Some(&b"++\xe5\xe5"[..]));
    }

    #[test]
    fn invalid_percent_sequences_stay_literal() {
        let query = q("a=%zz&b=x%&c=%4&d=%4g&e=%%41&f=%+4&g=%");
        assert_eq!(query.get("a"), Some(&b"%zz"[..]));
        assert_eq!(query.get("b"), Some(&b"x%"[..]));
        assert_eq!(query.get("c"), Some(&b"%4"[..]));
        assert_eq!(query.get("d"), Some(&b"%4g"[..]));
        assert_eq!(query.get("e"), Some(&b"%A"[..]));
        assert_eq!(query.get("f"), Some(&b"% 4"[..]));
        assert_eq!(query.get("g"), Some(&b"%"[..]));
    }

    #[test]
    fn invalid_percent_sequences_survive_the_second_decode() {
        let query = q("msg=%25zz%25");
        assert_eq!(query.get("msg"), Some(&b"%zz%"[..]));
        assert_eq!(query.get_unquoted("msg"), Some(b"%zz%".to_vec()));
    }

    #[test]
    fn escape_split_by_ampersand_is_not_joined() {
        let query = q("a=%4&1=x");
        assert_eq!(query.get("a"), Some(&b"%4"[..]));
        assert_eq!(query.get("1"), Some(&b"x"[..]));
    }

    #[test]
    fn non_utf8_bytes_are_kept() {
        let query = q("gm_name=%ff%fe&msg=%25ff");
        assert_eq!(query.get("gm_name"), Some(&b"\xff\xfe"[..]));
        assert_eq!(query.get_unquoted("msg"), Some(b"\xff".to_vec()));
    }

    #[test]
    fn raw_non_ascii_bytes_pass_through() {
        let query = LegacyQuery::parse(b"gm_name=\xe5\xbc\xa0\xff");
        assert_eq!(query.get("gm_name"), Some(&b"\xe5\xbc\xa0\xff"[..]));
    }

    #[test]
    fn chinese_name_encoded_once() {
        let query = q("gm_name=%E5%BC%A0%E4%B8%89");
        assert_eq!(query.get("gm_name"), Some("张三".as_bytes()));
        assert_eq!(query.get_unquoted("gm_name"), Some("张三".as_bytes().to_vec()));
    }

    #[test]
    fn chinese_name_encoded_twice() {
        let query = q("gm_name=%25E5%25BC%25A0%25E4%25B8%2589");
        assert_eq!(query.get("gm_name"), Some(&b"%E5%BC%A0%E4%B8%89"[..]));
        assert_eq!(query.get_unquoted("gm_name"), Some("张三".as_bytes().to_vec()));
    }

    #[test]
    fn chinese_name_with_plus_for_space() {
        let query = q("gm_name=%E5%BC%A0+%E4%B8%89");
        assert_eq!(query.get_unquoted("gm_name"), Some("张 三".as_bytes().to_vec()));
    }

    #[test]
    fn pairs_beyond_the_bound_are_ignored() {
        let mut raw: String = (0..MAX_QUERY_PAIRS).map(|i| format!("k{i}=v{i}&")).collect();
        raw.push_str("action=send");
        let query = q(&raw);
        assert_eq!(query.get("k0"), Some(&b"v0"[..]));
        let last = format!("k{}", MAX_QUERY_PAIRS - 1);
        let expected = format!("v{}", MAX_QUERY_PAIRS - 1);
        assert_eq!(query.get(&last), Some(expected.as_bytes()));
        assert_eq!(query.get("action"), None);
    }

    #[test]
    fn repeated_keys_count_toward_the_bound() {
        let mut raw = "x=1&".repeat(MAX_QUERY_PAIRS);
        raw.push_str("action=send");
        let query = q(&raw);
        assert_eq!(query.get("x"), Some(&b"1"[..]));
        assert_eq!(query.get("action"), None);
    }

    #[test]
    fn ignored_pieces_do_not_count_toward_the_bound() {
        let mut raw = "&=x&".repeat(MAX_QUERY_PAIRS);
        raw.push_str("action=send");
        let query = q(&raw);
        assert_eq!(query.get("action"), Some(&b"send"[..]));
    }

    #[test]
    fn buffer_never_outgrows_the_raw_query() {
        let raw = b"msg=%41%42%43+def&gm_name=%E5%BC%A0";
        let query = LegacyQuery::parse(raw);
        assert!(query.buf.capacity() <= raw.len());
        assert_eq!(query.get("msg"), Some(&b"ABC def"[..]));
    }

    #[test]
    fn unquote_decodes_percent_only() {
        assert_eq!(unquote(b"a+b%2B%2bc"), b"a+b++c");
        assert_eq!(unquote(b"%"), b"%");
        assert_eq!(unquote(b"%4"), b"%4");
        assert_eq!(unquote(b"%zz"), b"%zz");
        assert_eq!(unquote(b"%252B"), b"%2B");
        assert_eq!(unquote(b""), b"");
    }

    #[test]
    fn unquote_plus_turns_plus_into_space_first() {
        assert_eq!(unquote_plus(b"a+b%2B%2bc"), b"a b++c");
        assert_eq!(unquote_plus(b"+"), b" ");
        assert_eq!(unquote_plus(b"%+"), b"% ");
        assert_eq!(unquote_plus(b"%E5%BC%A0"), "张".as_bytes());
    }
}
