//! Bad input never panics, never answers 5xx, always gets a protocol reply: property tests
//! over every action and parameter, and over the parsers on their own.

mod support;

use gm_relay::adapters::http::query::LegacyQuery;
use gm_relay::domain::ids::parse_canonical;
use gm_relay::domain::{ChatText, Envelope, GmName};
use proptest::prelude::*;
use support::app::{b64, enc, TestApp};

const GM_ACTIONS: &[&str] = &["create", "add", "del", "online", "offline", "send", "receive"];
const GS_ACTIONS: &[&str] = &["relation", "send", "receive", "online"];
const KEYS: &[&str] = &["action", "gm_account", "gm_name", "host", "uid", "msg", "x"];

/// Values chosen to hit every check: ids in and out of canonical form, wildcards, dots,
/// bad percent-encoding, non-UTF-8, huge, and valid and invalid base64.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("0".to_owned()),
        Just("7".to_owned()),
        Just("-1".to_owned()),
        Just("1001".to_owned()),
        Just("007".to_owned()),
        Just("+5".to_owned()),
        Just("%205".to_owned()),
        Just("9223372036854775807".to_owned()),
        Just("9223372036854775808".to_owned()),
        Just("-9223372036854775809".to_owned()),
        Just("*".to_owned()),
        Just("%3E".to_owned()),
        Just("1.2".to_owned()),
        Just("%ff%fe".to_owned()),
        Just("%zz%".to_owned()),
        Just(enc("客服小王")),
        Just(enc(&b64("你好"))),
        Just(enc(&enc(&b64("a+b/c?")))),
        Just(b64("raw+plus")),
        Just("not base64!".to_owned()),
        Just("x".repeat(5000)),
        "[a-zA-Z0-9%+*>._-]{0,40}",
        any::<Vec<u8>>().prop_map(|bytes| bytes.iter().map(|b| format!("%{b:02X}")).collect()),
    ]
}

fn query() -> impl Strategy<Value = (bool, String)> {
    let action = prop_oneof![
        proptest::sample::select(GM_ACTIONS).prop_map(str::to_owned),
        proptest::sample::select(GS_ACTIONS).prop_map(str::to_owned),
        value(),
    ];
    let pairs = proptest::collection::vec((proptest::sample::select(KEYS), value()), 0..6);
    (any::<bool>(), action, pairs, any::<bool>()).prop_map(|(gm_side, action, pairs, repeat)| {
        let mut q = format!("action={action}");
        for (k, v) in &pairs {
            q.push_str(&format!("&{k}={v}"));
        }
        if repeat {
            q.push_str("&uid=1&uid=2&&=&noequals");
        }
        (gm_side, q)
    })
}

#[test]
fn every_request_gets_a_protocol_reply() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let app = runtime.block_on(async {
        let app = TestApp::spawn().await;
        app.create_gm(7, "Alice").await;
        app.add(7, 3, 1001).await;
        app
    });
    let config = ProptestConfig { cases: 400, failure_persistence: None, ..ProptestConfig::default() };
    proptest!(config, |((gm_side, q) in query())| {
        let reply = runtime.block_on(async {
            if gm_side { app.gm(&q).await } else { app.gs(&q).await }
        });
        let body = reply.text();
        match reply.status {
            200 => {
                prop_assert_eq!(&reply.content_type, "text/html");
                let json: serde_json::Value = serde_json::from_slice(&reply.body)
                    .map_err(|e| TestCaseError::fail(format!("{q}: not JSON ({e}): {body}")))?;
                let res = json["res"].as_i64();
                prop_assert!(res == Some(0) || res == Some(1), "{}: {}", q, body);
                prop_assert!(body.is_ascii(), "{}: {}", q, body);
                if let Some(errno) = json.get("errno") {
                    let errno = errno.as_i64().unwrap();
                    prop_assert!([-1, 1, 2, 3, 4, 5, 6, 7, 8, 10].contains(&errno), "{}: {}", q, body);
                }
            }
            404 => {
                prop_assert_eq!(&reply.content_type, "text/html");
                prop_assert!(reply.body.starts_with(b"err action "), "{}: {}", q, body);
            }
            414 => prop_assert_eq!(&reply.content_type, "text/plain"),
            other => prop_assert!(false, "{}: status {} {}", q, other, body),
        }
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

    /// The query parser takes any bytes.
    #[test]
    fn query_parser_never_panics(raw in any::<Vec<u8>>()) {
        let q = LegacyQuery::parse(&raw);
        for key in KEYS {
            let _ = q.get(key);
            let _ = q.get_unquoted(key);
        }
    }

    /// The envelope parser and text checks take any bytes.
    #[test]
    fn envelope_and_text_parsers_never_panic(raw in any::<Vec<u8>>()) {
        let _ = serde_json::from_slice::<Envelope>(&raw);
        let _ = ChatText::from_base64(&raw);
        let _ = GmName::parse(&raw);
        let _ = parse_canonical(&raw);
    }

    /// Every i64 round-trips through its canonical text, and nothing else parses.
    #[test]
    fn ids_round_trip(n in any::<i64>(), noise in "[ +0-9a-z.*>-]{0,22}") {
        prop_assert_eq!(parse_canonical(n.to_string().as_bytes()), Some(n));
        if let Some(v) = parse_canonical(noise.as_bytes()) {
            prop_assert_eq!(v.to_string(), noise);
        }
    }

    /// Valid messages round-trip exactly; the base64 sent is the base64 returned.
    #[test]
    fn chat_text_round_trips(text in "\\PC{1,500}") {
        let sent = b64(&text);
        let msg = ChatText::from_base64(sent.as_bytes()).expect("valid");
        prop_assert_eq!(msg.to_base64(), sent);
    }
}
