//! `gm-relay nats-auth`: writes the nats-server authorization that confines each game
//! server to its own events and requests.
//!
//! Every identity is an NKey user (ed25519): the server config holds only public keys; the
//! seeds (secrets) go to one file per identity, to hand to that game server, the relay or
//! the console. An existing seed file is reused, so re-running after adding hosts keeps
//! every other key; deleting a host's seed file and re-running rotates it.
//!
//! Host N may only: bind its durable consumer `host_N` (`CONSUMER.INFO`), pull from it
//! (`CONSUMER.MSG.NEXT`), ack its messages, request `gm.relay.gs.N.>`, and read replies on
//! its own inbox prefix `_INBOX_host_N` (clients set it with `custom_inbox_prefix`). It
//! cannot subscribe to any `gm.to.host.*` subject, bind another host's consumer or send
//! as another host. The console user only reads (see [`console_permissions`]).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::adapters::nats::names;
use crate::domain::HostId;

/// Hosts one invocation may cover; far above any deployment, it bounds a typo like
/// `1-999999999`.
pub const MAX_AUTH_HOSTS: usize = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("bad host list {0:?}: expected ids and ranges like 1-100,205")]
    HostList(String),
    #[error("host list has more than {MAX_AUTH_HOSTS} hosts")]
    TooManyHosts,
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not an NKey user seed")]
    BadSeed { path: PathBuf },
}

/// Parses `1-100,205,-3` into host ids (ranges inclusive).
pub fn parse_hosts(spec: &str) -> Result<Vec<HostId>, AuthError> {
    let bad = || AuthError::HostList(spec.to_owned());
    let mut hosts = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        // A leading '-' is a sign, not a range.
        let split = part.char_indices().skip(1).find(|(_, c)| *c == '-').map(|(i, _)| i);
        let (lo, hi) = match split {
            Some(i) => (&part[..i], &part[i + 1..]),
            None => (part, part),
        };
        let lo = HostId::parse(lo.as_bytes()).ok_or_else(bad)?;
        let hi = HostId::parse(hi.as_bytes()).ok_or_else(bad)?;
        if lo.0 > hi.0 || hi.0.abs_diff(lo.0) >= MAX_AUTH_HOSTS as u64 {
            return Err(if lo.0 > hi.0 { bad() } else { AuthError::TooManyHosts });
        }
        hosts.extend((lo.0..=hi.0).map(HostId));
        if hosts.len() > MAX_AUTH_HOSTS {
            return Err(AuthError::TooManyHosts);
        }
    }
    hosts.sort();
    hosts.dedup();
    if hosts.is_empty() {
        return Err(bad());
    }
    Ok(hosts)
}

/// The user of host `host`: the subjects it may publish and subscribe to.
pub fn host_permissions(host: HostId) -> (Vec<String>, Vec<String>) {
    let consumer = names::host_consumer(host);
    let stream = names::STREAM_TO_HOST;
    let publish = vec![
        "$JS.API.INFO".to_owned(),
        format!("$JS.API.CONSUMER.INFO.{stream}.{consumer}"),
        format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"),
        format!("$JS.ACK.{stream}.{consumer}.>"),
        format!("{}.{host}.>", names::SERVICE_PREFIX),
    ];
    let subscribe = vec![format!("_INBOX_{consumer}.>")];
    (publish, subscribe)
}

/// The console (ops tooling) reads: stream and consumer state, stored messages by sequence
/// or subject (direct gets), and the chat subjects live. It may not create, change, pull
/// from or ack any consumer, nor touch a stream: with `$JS.API.>` a leaked console key
/// could purge every host's undelivered events or take the legacy GM feed's messages.
pub fn console_permissions() -> (Vec<String>, Vec<String>) {
    let publish = [
        "$JS.API.INFO",
        "$JS.API.STREAM.NAMES",
        "$JS.API.STREAM.LIST",
        "$JS.API.STREAM.INFO.*",
        "$JS.API.STREAM.MSG.GET.*",
        "$JS.API.DIRECT.GET.>",
        "$JS.API.CONSUMER.NAMES.*",
        "$JS.API.CONSUMER.LIST.*",
        "$JS.API.CONSUMER.INFO.*.*",
    ];
    let subscribe =
        ["_INBOX_console.>", names::SUBJECTS_TO_GM, names::SUBJECTS_TO_HOST, names::SUBJECTS_HISTORY];
    (publish.map(str::to_owned).to_vec(), subscribe.map(str::to_owned).to_vec())
}

fn quoted(list: &[String]) -> String {
    list.iter().map(|s| format!("\"{s}\"")).collect::<Vec<_>>().join(", ")
}

/// Reads the seed at `path`, or creates one there (mode 0600).
fn load_or_create_seed(path: &Path) -> Result<nkeys::KeyPair, AuthError> {
    let io = |source| AuthError::Io { path: path.to_owned(), source };
    if path.exists() {
        let seed = std::fs::read_to_string(path).map_err(io)?;
        return nkeys::KeyPair::from_seed(seed.trim())
            .map_err(|_| AuthError::BadSeed { path: path.to_owned() });
    }
    let pair = nkeys::KeyPair::new_user();
    let seed = pair.seed().map_err(|_| AuthError::BadSeed { path: path.to_owned() })?;
    write_private(path, &format!("{seed}\n")).map_err(io)?;
    Ok(pair)
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)?.write_all(text.as_bytes())
}

/// Writes the authorization block to `out` and the seeds to `keys_dir` (`relay.nk`,
/// `console.nk`, `host_<n>.nk`). Returns the number of users.
pub fn generate(hosts: &[HostId], out: &Path, keys_dir: &Path) -> Result<usize, AuthError> {
    std::fs::create_dir_all(keys_dir)
        .map_err(|source| AuthError::Io { path: keys_dir.to_owned(), source })?;
    let mut conf = String::from(
        "# Written by `gm-relay nats-auth`: NKey users and their permissions.\n\
         # Include it from the nats-server config: include \"auth.conf\"\n\
         authorization {\n  users = [\n",
    );
    let mut user = |name: &str, publish: &[String], subscribe: &[String]| -> Result<(), AuthError> {
        let pair = load_or_create_seed(&keys_dir.join(format!("{name}.nk")))?;
        let _ = writeln!(
            conf,
            "    # {name}\n    {{ nkey: \"{}\", permissions: {{ publish: {{ allow: [{}] }}, subscribe: {{ allow: [{}] }} }} }}",
            pair.public_key(),
            quoted(publish),
            quoted(subscribe),
        );
        Ok(())
    };
    user("relay", &[">".to_owned()], &[">".to_owned()])?;
    let (p, s) = console_permissions();
    user("console", &p, &s)?;
    for host in hosts {
        let (p, s) = host_permissions(*host);
        user(&names::host_consumer(*host), &p, &s)?;
    }
    conf.push_str("  ]\n}\n");
    write_private(out, &conf).map_err(|source| AuthError::Io { path: out.to_owned(), source })?;
    Ok(hosts.len() + 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_lists() {
        assert_eq!(parse_hosts("1-3,7,2").unwrap(), vec![HostId(1), HostId(2), HostId(3), HostId(7)]);
        assert_eq!(parse_hosts("-2--1").unwrap(), vec![HostId(-2), HostId(-1)]);
        for bad in ["", "a", "3-1", "1-", "007", "1-2-3"] {
            assert!(parse_hosts(bad).is_err(), "{bad:?}");
        }
        assert!(matches!(parse_hosts("0-100000"), Err(AuthError::TooManyHosts)));
        // The widest range the ids allow is too many, not an overflow.
        assert!(matches!(
            parse_hosts("-9223372036854775808-9223372036854775807"),
            Err(AuthError::TooManyHosts)
        ));
    }

    #[test]
    fn the_console_only_reads() {
        let (publish, _) = console_permissions();
        for verb in ["CREATE", "UPDATE", "DELETE", "PURGE", "MSG.NEXT", "RESET", "$JS.ACK", "$JS.API.>"] {
            assert!(publish.iter().all(|s| !s.contains(verb)), "{verb} in {publish:?}");
        }
    }

    #[test]
    fn permissions_name_only_the_hosts_own_subjects() {
        let (publish, subscribe) = host_permissions(HostId(12));
        assert!(publish.contains(&"$JS.API.CONSUMER.MSG.NEXT.GM_TO_HOST.host_12".to_owned()));
        assert!(publish.contains(&"gm.relay.gs.12.>".to_owned()));
        assert!(publish.iter().chain(&subscribe).all(|s| !s.contains("gm.to.host")));
        assert_eq!(subscribe, vec!["_INBOX_host_12.>"]);
    }

    #[test]
    fn seeds_are_reused() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("auth.conf");
        generate(&[HostId(1)], &out, dir.path()).unwrap();
        let first = std::fs::read_to_string(&out).unwrap();
        generate(&[HostId(1), HostId(2)], &out, dir.path()).unwrap();
        let second = std::fs::read_to_string(&out).unwrap();
        let key_line = |conf: &str| conf.lines().find(|l| l.contains("_INBOX_host_1.")).unwrap().to_owned();
        assert_eq!(key_line(&first), key_line(&second));
        assert!(second.contains("_INBOX_host_2."));
    }
}
