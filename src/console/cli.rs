//! `gm-relay gm set-password <gm_account> [--supervisor] [--config <file>]`: gives a GM
//! account a console password, read from standard input (so it never shows in `ps` or a
//! shell history), and a role. Settings come from the environment and the config file,
//! as for `serve`; only the Redis URL is used.
//!
//! Exit codes: 0 done, 2 bad usage, setting or password (one line says which), 1 Redis
//! failed.

use std::io::Read;

use super::accounts::{set_password, SetPasswordError, MAX_PASSWORD_BYTES};
use crate::adapters::redis::RedisStore;
use crate::config::Config;
use crate::domain::session::Role;
use crate::domain::GmId;

pub const USAGE: &str =
    "       gm-relay gm set-password <gm_account> [--supervisor] [--config <file>]   (password on stdin)";

/// Runs `gm-relay gm <args>`; returns the exit code.
pub fn run(args: &[String], stdin: &mut impl Read) -> u8 {
    let usage = || {
        eprintln!("usage:\n{USAGE}");
        2
    };
    let [cmd, gm, rest @ ..] = args else {
        return usage();
    };
    if cmd != "set-password" {
        return usage();
    }
    let Some(gm) = GmId::parse(gm.as_bytes()) else {
        eprintln!("gm-relay gm set-password: {gm:?} is not a GM account id (a canonical decimal)");
        return 2;
    };
    let mut role = Role::Gm;
    let mut config_path = None;
    let mut rest = rest.iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--supervisor" => role = Role::Supervisor,
            "--config" => match rest.next() {
                Some(path) => config_path = Some(path.clone()),
                None => return usage(),
            },
            _ => return usage(),
        }
    }
    let config = match Config::load(config_path.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return 2;
        }
    };
    let password = match read_password(stdin) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("gm-relay gm set-password: {e}");
            return 2;
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return 1;
        }
    };
    let result = runtime.block_on(async {
        let store = RedisStore::connect(&config.redis_url).await.map_err(|e| {
            SetPasswordError::Store(crate::domain::RelayError::unavailable(crate::domain::Backend::Redis, e))
        })?;
        set_password(&store, gm, &password, role).await
    });
    match result {
        Ok(_) => {
            println!("password set for GM {gm} (role {}); sessions signed before are over", role.as_str());
            0
        }
        Err(e @ SetPasswordError::Store(_)) => {
            eprintln!("gm-relay gm set-password: {e}");
            1
        }
        Err(e) => {
            eprintln!("gm-relay gm set-password: {e}");
            2
        }
    }
}

/// The password: standard input without one trailing newline, as `echo` or a password
/// manager's pipe leaves it.
fn read_password(stdin: &mut impl Read) -> Result<String, SetPasswordError> {
    let mut raw = Vec::new();
    // One byte more than allowed, plus a newline, tells "too long" from "just fits".
    stdin
        .take(MAX_PASSWORD_BYTES as u64 + 3)
        .read_to_end(&mut raw)
        .map_err(|e| SetPasswordError::Input(e.to_string()))?;
    let text = String::from_utf8(raw).map_err(|_| SetPasswordError::Input("it is not UTF-8".into()))?;
    let text = text.strip_suffix('\n').map(|t| t.strip_suffix('\r').unwrap_or(t)).unwrap_or(&text);
    Ok(text.to_owned())
}
