//! The one typed configuration, read at start-up and validated before anything runs.
//!
//! Sources, later wins: built-in defaults, then a file (`--config <path>` or
//! `GM_RELAY_CONFIG`) of `KEY=value` lines with the same keys as the environment, then
//! the environment. A missing or invalid setting stops start-up with one line naming it.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;

use crate::domain::session::SessionKey;

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub nats_url: String,
    /// NKey seed of the relay's NATS user (`gm-relay nats-auth` writes `relay.nk`).
    pub nats_nkey_seed: Option<String>,
    pub redis_url: String,
    pub gm_path: String,
    pub gs_path: String,
    pub gm_allow: Vec<IpNet>,
    pub gs_allow: Vec<IpNet>,
    pub gs_list_url: Option<String>,
    pub gs_list_refresh: Duration,
    pub role_info_url: Option<String>,
    pub role_timeout: Duration,
    pub trusted_proxies: Vec<IpNet>,
    pub retention_max_age: Duration,
    pub retention_max_bytes: i64,
    pub stream_replicas: usize,
    /// Replicas of the consumers the relay creates; 0 = as many as their stream.
    pub consumer_replicas: usize,
    pub rate_gm_per_s: u32,
    pub rate_player_per_s: u32,
    pub rate_ip_per_s: u32,
    /// Console session signing key; the console is on exactly when it is set.
    pub session_key: Option<SessionKey>,
    pub log_format: LogFormat,
    pub shutdown_timeout: Duration,
    /// Threads of the async runtime; 1 = a current-thread runtime (see
    /// [`crate::startup::runtime`]).
    pub worker_threads: usize,
}

/// Most runtime threads accepted: past the machine's cores more threads only add context
/// switches; 64 covers any box a relay runs on, and a typo like 1000 is refused.
pub const MAX_WORKER_THREADS: usize = 64;

/// Longest role service timeout accepted, in milliseconds. An `add` waits for the role
/// service and a few Redis commands (2 s each at most) inside the 15 s request bound
/// ([`crate::adapters::http::REQUEST_TIMEOUT`]); past that bound the client would get an
/// HTTP 503 instead of errno 7.
pub const MAX_ROLE_TIMEOUT_MS: u64 = 5_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Pretty,
}

/// A setting that is missing or does not parse; `Display` is the one line shown at exit.
#[derive(Debug, thiserror::Error)]
#[error("invalid setting {key}: {reason}")]
pub struct ConfigError {
    pub key: String,
    pub reason: String,
}

fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError { key: key.to_owned(), reason: reason.into() }
}

/// Every key, its default and a line of help; the README's table mirrors this list.
pub const SETTINGS: &[(&str, &str, &str)] = &[
    ("GM_RELAY_LISTEN", "127.0.0.1:8080", "HTTP listen address"),
    ("GM_RELAY_NATS_URL", "nats://127.0.0.1:4222", "NATS server URL"),
    ("GM_RELAY_NATS_NKEY_FILE", "", "file with the relay's NKey seed; empty = no NATS auth"),
    ("GM_RELAY_REDIS_URL", "redis://127.0.0.1:6379", "Redis URL"),
    ("GM_RELAY_GM_PATH", "/gm", "path of the legacy GM endpoint"),
    ("GM_RELAY_GS_PATH", "/gs", "path of the legacy game-server endpoint"),
    ("GM_RELAY_GM_ALLOW", "127.0.0.1,::1", "IPs/CIDRs allowed on the GM endpoint"),
    ("GM_RELAY_GS_ALLOW", "127.0.0.1,::1", "IPs/CIDRs allowed on the GS endpoint"),
    ("GM_RELAY_GS_LIST_URL", "", "server list URL whose IPs join the GS allowlist"),
    ("GM_RELAY_GS_LIST_REFRESH_S", "60", "server list refresh period, seconds"),
    ("GM_RELAY_ROLE_INFO_URL", "", "role service URL template with {uid} and {host}; empty = off"),
    ("GM_RELAY_ROLE_TIMEOUT_MS", "2000", "role service timeout, milliseconds (1 to 5000)"),
    ("GM_RELAY_TRUSTED_PROXIES", "", "proxies whose X-Real-IP / X-Forwarded-For are believed"),
    ("GM_RELAY_RETENTION_MAX_AGE", "7d", "how long a stream keeps a message"),
    ("GM_RELAY_RETENTION_MAX_BYTES", "10GiB", "size bound of each stream"),
    ("GM_RELAY_STREAM_REPLICAS", "1", "stream replicas (3 or 5 on a cluster)"),
    ("GM_RELAY_CONSUMER_REPLICAS", "", "consumer replicas, at most the streams'; empty = as the streams"),
    ("GM_RELAY_RATE_GM_PER_S", "10", "GM sends per second per GM; 0 = off"),
    ("GM_RELAY_RATE_PLAYER_PER_S", "5", "player sends per second per player; 0 = off"),
    ("GM_RELAY_RATE_IP_PER_S", "2000", "requests per second per client IP; 0 = off"),
    ("GM_RELAY_SESSION_KEY", "", "console session signing key, at least 32 bytes; set = console on"),
    ("GM_RELAY_LOG_FORMAT", "json", "json or pretty"),
    ("GM_RELAY_SHUTDOWN_TIMEOUT_S", "10", "bound on graceful shutdown, seconds"),
    ("GM_RELAY_WORKER_THREADS", "1", "async runtime threads; 1 = one core, run more relays to use more"),
];

impl Config {
    /// Reads the file named by `config_path` (or `GM_RELAY_CONFIG`) and the environment.
    pub fn load(config_path: Option<&str>) -> Result<Config, ConfigError> {
        let env: HashMap<String, String> =
            std::env::vars().filter(|(k, _)| k.starts_with("GM_RELAY_")).collect();
        let path = config_path.map(str::to_owned).or_else(|| env.get("GM_RELAY_CONFIG").cloned());
        let mut values = match path {
            Some(p) => {
                let text = std::fs::read_to_string(&p)
                    .map_err(|e| invalid("GM_RELAY_CONFIG", format!("cannot read {p}: {e}")))?;
                parse_file(&text)?
            }
            None => HashMap::new(),
        };
        values.extend(env);
        Self::from_map(&values)
    }

    /// Builds the config from explicit values (defaults fill the rest).
    pub fn from_map(values: &HashMap<String, String>) -> Result<Config, ConfigError> {
        let get = |key: &str| -> String {
            values.get(key).cloned().unwrap_or_else(|| {
                SETTINGS.iter().find(|(k, _, _)| *k == key).map(|(_, d, _)| d.to_string()).unwrap_or_default()
            })
        };
        let opt = |key: &str| Some(get(key)).filter(|v| !v.trim().is_empty());
        let config = Config {
            listen: get("GM_RELAY_LISTEN").parse().map_err(|e| invalid("GM_RELAY_LISTEN", format!("{e}")))?,
            nats_url: url_like("GM_RELAY_NATS_URL", get("GM_RELAY_NATS_URL"), &["nats://", "tls://"])?,
            nats_nkey_seed: opt("GM_RELAY_NATS_NKEY_FILE").map(|p| read_seed(&p)).transpose()?,
            redis_url: url_like("GM_RELAY_REDIS_URL", get("GM_RELAY_REDIS_URL"), &["redis://", "rediss://"])?,
            gm_path: path("GM_RELAY_GM_PATH", get("GM_RELAY_GM_PATH"))?,
            gs_path: path("GM_RELAY_GS_PATH", get("GM_RELAY_GS_PATH"))?,
            gm_allow: nets("GM_RELAY_GM_ALLOW", &get("GM_RELAY_GM_ALLOW"))?,
            gs_allow: nets("GM_RELAY_GS_ALLOW", &get("GM_RELAY_GS_ALLOW"))?,
            gs_list_url: opt("GM_RELAY_GS_LIST_URL")
                .map(|u| url_like("GM_RELAY_GS_LIST_URL", u, &["http://", "https://"]))
                .transpose()?,
            gs_list_refresh: Duration::from_secs(positive(
                "GM_RELAY_GS_LIST_REFRESH_S",
                &get("GM_RELAY_GS_LIST_REFRESH_S"),
            )?),
            role_info_url: opt("GM_RELAY_ROLE_INFO_URL").map(role_template).transpose()?,
            role_timeout: Duration::from_millis(at_most(
                "GM_RELAY_ROLE_TIMEOUT_MS",
                &get("GM_RELAY_ROLE_TIMEOUT_MS"),
                MAX_ROLE_TIMEOUT_MS,
            )?),
            trusted_proxies: nets("GM_RELAY_TRUSTED_PROXIES", &get("GM_RELAY_TRUSTED_PROXIES"))?,
            retention_max_age: parse_duration(&get("GM_RELAY_RETENTION_MAX_AGE"))
                .ok_or_else(|| invalid("GM_RELAY_RETENTION_MAX_AGE", "expected e.g. 7d, 12h, 30m, 90s"))?,
            retention_max_bytes: parse_bytes(&get("GM_RELAY_RETENTION_MAX_BYTES"))
                .ok_or_else(|| invalid("GM_RELAY_RETENTION_MAX_BYTES", "expected e.g. 10GiB, 512MiB"))?,
            stream_replicas: match get("GM_RELAY_STREAM_REPLICAS").trim() {
                "1" => 1,
                "3" => 3,
                "5" => 5,
                _ => return Err(invalid("GM_RELAY_STREAM_REPLICAS", "expected 1, 3 or 5")),
            },
            consumer_replicas: match opt("GM_RELAY_CONSUMER_REPLICAS").as_deref().map(str::trim) {
                None => 0,
                Some("1") => 1,
                Some("3") => 3,
                Some("5") => 5,
                Some(_) => return Err(invalid("GM_RELAY_CONSUMER_REPLICAS", "expected 1, 3 or 5")),
            },
            rate_gm_per_s: rate("GM_RELAY_RATE_GM_PER_S", &get("GM_RELAY_RATE_GM_PER_S"))?,
            rate_player_per_s: rate("GM_RELAY_RATE_PLAYER_PER_S", &get("GM_RELAY_RATE_PLAYER_PER_S"))?,
            rate_ip_per_s: rate("GM_RELAY_RATE_IP_PER_S", &get("GM_RELAY_RATE_IP_PER_S"))?,
            session_key: opt("GM_RELAY_SESSION_KEY")
                .map(|k| {
                    SessionKey::new(k.as_bytes()).map_err(|e| invalid("GM_RELAY_SESSION_KEY", e.to_string()))
                })
                .transpose()?,
            log_format: match get("GM_RELAY_LOG_FORMAT").trim() {
                "json" => LogFormat::Json,
                "pretty" => LogFormat::Pretty,
                _ => return Err(invalid("GM_RELAY_LOG_FORMAT", "expected json or pretty")),
            },
            shutdown_timeout: Duration::from_secs(positive(
                "GM_RELAY_SHUTDOWN_TIMEOUT_S",
                &get("GM_RELAY_SHUTDOWN_TIMEOUT_S"),
            )?),
            worker_threads: at_most(
                "GM_RELAY_WORKER_THREADS",
                &get("GM_RELAY_WORKER_THREADS"),
                MAX_WORKER_THREADS as u64,
            )? as usize,
        };
        if config.consumer_replicas > config.stream_replicas {
            return Err(invalid("GM_RELAY_CONSUMER_REPLICAS", "must not exceed GM_RELAY_STREAM_REPLICAS"));
        }
        if config.gm_path == config.gs_path {
            return Err(invalid("GM_RELAY_GS_PATH", "must differ from GM_RELAY_GM_PATH"));
        }
        Ok(config)
    }
}

fn parse_file(text: &str) -> Result<HashMap<String, String>, ConfigError> {
    let mut out = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| invalid("GM_RELAY_CONFIG", format!("line {}: expected KEY=value", n + 1)))?;
        let k = k.trim();
        if !SETTINGS.iter().any(|(key, _, _)| *key == k) {
            return Err(invalid(k, format!("unknown setting (config file line {})", n + 1)));
        }
        out.insert(k.to_owned(), v.trim().trim_matches('"').to_owned());
    }
    Ok(out)
}

fn read_seed(path: &str) -> Result<String, ConfigError> {
    let key = "GM_RELAY_NATS_NKEY_FILE";
    let seed = std::fs::read_to_string(path).map_err(|e| invalid(key, format!("cannot read {path}: {e}")))?;
    let seed = seed.trim().to_owned();
    if !seed.starts_with("SU") {
        return Err(invalid(key, format!("{path} does not hold an NKey user seed")));
    }
    Ok(seed)
}

/// A URL with one of `schemes`.
fn url_like(key: &str, v: String, schemes: &[&str]) -> Result<String, ConfigError> {
    match schemes.iter().find(|s| v.starts_with(**s)) {
        Some(scheme) if v.len() > scheme.len() => Ok(v),
        _ => Err(invalid(key, format!("expected a URL starting with {}", schemes.join(" or ")))),
    }
}

/// The role service's URL template: without both placeholders every `add` would ask about
/// the same player (the original's `%s` template, copied as it was, is the likely case).
fn role_template(v: String) -> Result<String, ConfigError> {
    const KEY: &str = "GM_RELAY_ROLE_INFO_URL";
    let v = url_like(KEY, v, &["http://", "https://"])?;
    if !(v.contains("{uid}") && v.contains("{host}")) {
        return Err(invalid(
            KEY,
            "expected a template with {uid} and {host}, e.g. http://roles/info?uid={uid}&hostnum={host}",
        ));
    }
    Ok(v)
}

fn path(key: &str, v: String) -> Result<String, ConfigError> {
    let reserved = ["/healthz", "/readyz", "/metrics"];
    // The console owns everything under /console.
    let console = v == "/console" || v.starts_with("/console/");
    // The router reads `{name}` as a parameter and refuses segments starting with `:` or
    // `*` (its old syntax): such a path is meant literally by nobody.
    let router_syntax = v.contains(['{', '}']) || v.split('/').any(|seg| seg.starts_with([':', '*']));
    if !v.starts_with('/')
        || v.len() < 2
        || v.contains(['?', '#', ' '])
        || router_syntax
        || reserved.contains(&v.as_str())
        || console
    {
        return Err(invalid(key, "expected a path like /gm"));
    }
    Ok(v)
}

/// Comma-separated IPs or CIDRs; a bare IP is a /32 or /128.
pub fn nets(key: &str, v: &str) -> Result<Vec<IpNet>, ConfigError> {
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<IpNet>()
                .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| invalid(key, format!("{s:?} is not an IP or CIDR")))
        })
        .collect()
}

fn positive(key: &str, v: &str) -> Result<u64, ConfigError> {
    match v.trim().parse::<u64>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(invalid(key, "expected a positive integer")),
    }
}

/// A positive integer no larger than `max`.
fn at_most(key: &str, v: &str, max: u64) -> Result<u64, ConfigError> {
    match v.trim().parse::<u64>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(invalid(key, format!("expected 1 to {max}"))),
    }
}

fn rate(key: &str, v: &str) -> Result<u32, ConfigError> {
    v.trim().parse::<u32>().map_err(|_| invalid(key, "expected a non-negative integer (0 = off)"))
}

/// `7d`, `12h`, `30m`, `90s`.
pub fn parse_duration(v: &str) -> Option<Duration> {
    let v = v.trim();
    let unit = v.chars().last()?;
    let n: u64 = v[..v.len() - unit.len_utf8()].parse().ok().filter(|n| *n > 0)?;
    let secs = match unit {
        's' => n,
        'm' => n.checked_mul(60)?,
        'h' => n.checked_mul(3600)?,
        'd' => n.checked_mul(86_400)?,
        _ => return None,
    };
    Some(Duration::from_secs(secs))
}

/// `10GiB`, `512MiB`, `64KiB`, `1000` (bytes).
pub fn parse_bytes(v: &str) -> Option<i64> {
    let v = v.trim();
    let (digits, mult) =
        [("TiB", 1i64 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10), ("B", 1)]
            .iter()
            .find_map(|(suffix, m)| v.strip_suffix(suffix).map(|d| (d, *m)))
            .unwrap_or((v, 1));
    digits.trim().parse::<i64>().ok().filter(|n| *n > 0)?.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_map(&pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }

    #[test]
    fn defaults_are_valid() {
        let c = with(&[]).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.retention_max_age, Duration::from_secs(7 * 86_400));
        assert_eq!(c.retention_max_bytes, 10 << 30);
        assert_eq!(c.gm_allow.len(), 2);
        assert!(c.role_info_url.is_none());
    }

    #[test]
    fn bad_values_name_the_key() {
        for (k, v) in [
            ("GM_RELAY_LISTEN", "nope"),
            ("GM_RELAY_NATS_URL", "http://x"),
            ("GM_RELAY_GM_ALLOW", "10.0.0.0/33"),
            ("GM_RELAY_RETENTION_MAX_AGE", "7 days"),
            ("GM_RELAY_RETENTION_MAX_BYTES", "-1"),
            ("GM_RELAY_ROLE_TIMEOUT_MS", "0"),
            ("GM_RELAY_ROLE_TIMEOUT_MS", "5001"),
            ("GM_RELAY_RATE_GM_PER_S", "-3"),
            ("GM_RELAY_GM_PATH", "gm"),
            ("GM_RELAY_GS_PATH", "/console/x"),
            ("GM_RELAY_GM_PATH", "/gm/:x"),
            ("GM_RELAY_GM_PATH", "/gm/*rest"),
            ("GM_RELAY_GS_PATH", "/{a}"),
            ("GM_RELAY_GS_PATH", "/gs}"),
            ("GM_RELAY_ROLE_INFO_URL", "http://roles?uid=%s&hostnum=%s"),
            ("GM_RELAY_ROLE_INFO_URL", "http://roles?uid={uid}"),
            ("GM_RELAY_ROLE_INFO_URL", "ftp://roles?uid={uid}&hostnum={host}"),
            ("GM_RELAY_GS_LIST_URL", "https://"),
            ("GM_RELAY_REDIS_URL", "unix:///run/redis.sock"),
            ("GM_RELAY_SESSION_KEY", "too-short"),
            ("GM_RELAY_WORKER_THREADS", "0"),
            ("GM_RELAY_WORKER_THREADS", "65"),
        ] {
            let e = with(&[(k, v)]).unwrap_err();
            assert_eq!(e.key, k, "{e}");
            assert!(e.to_string().starts_with(&format!("invalid setting {k}: ")));
        }
    }

    #[test]
    fn accepted_paths_and_templates() {
        let c = with(&[
            ("GM_RELAY_GM_PATH", "/chat/gm.php"),
            ("GM_RELAY_GS_PATH", "/chat/gs-x_1"),
            ("GM_RELAY_ROLE_INFO_URL", "https://roles/info?uid={uid}&hostnum={host}"),
            ("GM_RELAY_GS_LIST_URL", "https://ops/servers.txt"),
            ("GM_RELAY_REDIS_URL", "rediss://redis.internal:6380"),
        ])
        .unwrap();
        // The router takes them as they are (it panics on a path it cannot read).
        let _ = axum::Router::<()>::new()
            .route(&c.gm_path, axum::routing::get(|| async { "" }))
            .route(&c.gs_path, axum::routing::get(|| async { "" }));
        assert_eq!(c.role_info_url.as_deref(), Some("https://roles/info?uid={uid}&hostnum={host}"));
        assert_eq!(c.gs_list_url.as_deref(), Some("https://ops/servers.txt"));
        assert_eq!(c.redis_url, "rediss://redis.internal:6380");
    }

    #[test]
    fn one_runtime_thread_unless_asked_for_more() {
        use tokio::runtime::RuntimeFlavor;
        let flavor = |c: Config| crate::startup::runtime(c.worker_threads).unwrap().handle().runtime_flavor();
        assert_eq!(flavor(with(&[]).unwrap()), RuntimeFlavor::CurrentThread);
        let four = with(&[("GM_RELAY_WORKER_THREADS", "4")]).unwrap();
        assert_eq!(four.worker_threads, 4);
        assert_eq!(flavor(four), RuntimeFlavor::MultiThread);
    }

    #[test]
    fn consumer_replicas_default_to_the_streams_and_never_exceed_them() {
        assert_eq!(with(&[]).unwrap().consumer_replicas, 0);
        let c = with(&[("GM_RELAY_STREAM_REPLICAS", "3"), ("GM_RELAY_CONSUMER_REPLICAS", "1")]).unwrap();
        assert_eq!((c.stream_replicas, c.consumer_replicas), (3, 1));
        for bad in ["3", "2"] {
            let e = with(&[("GM_RELAY_CONSUMER_REPLICAS", bad)]).unwrap_err();
            assert_eq!(e.key, "GM_RELAY_CONSUMER_REPLICAS", "{e}");
        }
    }

    #[test]
    fn file_lines_and_unknown_keys() {
        let m =
            parse_file("# comment\nGM_RELAY_LISTEN = 127.0.0.1:9000\n\nGM_RELAY_GM_PATH=\"/g\"\n").unwrap();
        assert_eq!(m["GM_RELAY_LISTEN"], "127.0.0.1:9000");
        assert_eq!(m["GM_RELAY_GM_PATH"], "/g");
        assert_eq!(parse_file("GM_RELAY_NOPE=1").unwrap_err().key, "GM_RELAY_NOPE");
    }

    #[test]
    fn units() {
        assert_eq!(parse_duration("90s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("2h"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_duration("0d"), None);
        // A unit that is not one byte is refused, not a panic.
        assert_eq!(parse_duration("7д"), None);
        assert_eq!(parse_duration("д"), None);
        assert_eq!(parse_bytes("512MiB"), Some(512 << 20));
        assert_eq!(parse_bytes("1000"), Some(1000));
        assert_eq!(parse_bytes("x"), None);
    }
}
