//! The console in a real browser: Debian's headless Chromium, driven from Rust over
//! WebDriver (fantoccini + chromedriver), against a relay with real nats-server and
//! redis-server, all on loopback.
//!
//! `./deploy/test` installs `chromium` and `chromium-driver` when missing; without them
//! these tests fail (never skip) saying what to install. A failing test saves a
//! screenshot under `target/console-browser/`. Every wait is for a condition on the page,
//! with a deadline. `GM_RELAY_UPDATE_SCREENSHOTS=1` also writes the README's screenshots
//! (`docs/screenshots/`).

mod support;

use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use futures::FutureExt;
use gm_relay::domain::session::Role;
use serde_json::json;
use support::app::TestApp;
use support::console::{create_gm_with_password, spawn_console};

/// Bound on chromedriver starting and answering `/status`.
const DRIVER_START: Duration = Duration::from_secs(20);

/// Bound on anything a test waits for on a page: live updates arrive in well under a
/// second, the dashboard refreshes once a second; CI has 2 shared cores.
const PAGE_WAIT: Duration = Duration::from_secs(15);

/// Bound on a whole browser test, whatever hangs (chromedriver calls have no timeout of
/// their own).
const TEST_BOUND: Duration = Duration::from_secs(120);

/// How often a page condition is checked while waiting.
const PAGE_POLL: Duration = Duration::from_millis(100);

/// Ports tried for chromedriver when the one we picked was taken meanwhile.
const DRIVER_PORT_ATTEMPTS: usize = 5;

const PASSWORD: &str = "correct horse battery";

fn find(env: &str, candidates: &[&str], what: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env).filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default();
    candidates
        .iter()
        .map(PathBuf::from)
        .chain(
            candidates
                .iter()
                .flat_map(|c| on_path.iter().map(move |dir| dir.join(Path::new(c).file_name().unwrap()))),
        )
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{what} not found (looked at ${env}, {candidates:?} and PATH). The browser tests need \
                 Debian's chromium and chromium-driver: run ./deploy/test, which installs them, or \
                 `apt-get install -y chromium chromium-driver`"
            )
        })
}

/// A chromedriver on a loopback port, and the temporary profile of its browser.
struct Driver {
    child: Child,
    port: u16,
    _profile: tempfile::TempDir,
    profile_path: PathBuf,
    chromium: PathBuf,
}

impl Driver {
    fn start() -> Driver {
        let chromium = find("GM_RELAY_CHROMIUM", &["/usr/bin/chromium"], "chromium");
        let driver = find("GM_RELAY_CHROMEDRIVER", &["/usr/bin/chromedriver"], "chromedriver");
        let profile = tempfile::Builder::new().prefix("gm-relay-chromium-").tempdir().expect("profile dir");
        let log = profile.path().join("chromedriver.log");
        for _ in 0..DRIVER_PORT_ATTEMPTS {
            let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let mut cmd = Command::new(&driver);
            cmd.arg(format!("--port={port}"))
                .arg(format!("--log-path={}", log.display()))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            let mut child =
                support::spawn_child(cmd).unwrap_or_else(|e| panic!("cannot run {}: {e}", driver.display()));
            let started = Instant::now();
            loop {
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    let profile_path = profile.path().join("profile");
                    return Driver { child, port, _profile: profile, profile_path, chromium };
                }
                if let Ok(Some(_)) = child.try_wait() {
                    break; // port taken: try another
                }
                if started.elapsed() > DRIVER_START {
                    let _ = child.kill();
                    panic!(
                        "chromedriver did not listen within {DRIVER_START:?}: {}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
                std::thread::sleep(PAGE_POLL);
            }
        }
        panic!("chromedriver found no free port: {}", std::fs::read_to_string(&log).unwrap_or_default());
    }

    async fn browser(&self) -> Client {
        // Flags known to work on these machines: no sandbox as root, and nothing that
        // reaches for the network (it is closed; refused connections slow Chromium down).
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--window-size=1280,800",
            "--lang=en-US",
        ];
        let mut args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        args.push(format!("--user-data-dir={}", self.profile_path.display()));
        let caps = json!({
            "browserName": "chrome",
            "goog:chromeOptions": { "binary": self.chromium, "args": args },
        });
        let caps = caps.as_object().unwrap().clone();
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        tokio::time::timeout(
            DRIVER_START,
            ClientBuilder::new(connector)
                .capabilities(caps)
                .connect(&format!("http://127.0.0.1:{}", self.port)),
        )
        .await
        .expect("chromium starts in time")
        .expect("a WebDriver session with headless chromium")
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `body` with a fresh browser; on failure saves a screenshot as
/// `target/console-browser/<name>.png`, then closes the browser and re-raises.
async fn with_browser<F, Fut>(name: &str, body: F)
where
    F: FnOnce(Client) -> Fut,
    Fut: Future<Output = ()>,
{
    let driver = Driver::start();
    let client = driver.browser().await;
    let bounded = async {
        if tokio::time::timeout(TEST_BOUND, body(client.clone())).await.is_err() {
            panic!("the browser test did not finish within {TEST_BOUND:?}");
        }
    };
    let outcome = std::panic::AssertUnwindSafe(bounded).catch_unwind().await;
    if outcome.is_err() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/console-browser");
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join(format!("{name}.png"));
        match client.screenshot().await {
            Ok(png) if std::fs::write(&path, &png).is_ok() => {
                eprintln!("screenshot of the failure: {}", path.display())
            }
            Ok(_) => eprintln!("could not write {}", path.display()),
            Err(e) => eprintln!("could not take a screenshot: {e}"),
        }
    }
    let _ = tokio::time::timeout(DRIVER_START, client.close()).await;
    drop(driver);
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// Writes a README screenshot when `GM_RELAY_UPDATE_SCREENSHOTS=1`.
async fn readme_screenshot(client: &Client, file: &str) {
    if std::env::var("GM_RELAY_UPDATE_SCREENSHOTS").as_deref() != Ok("1") {
        return;
    }
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/screenshots");
    std::fs::create_dir_all(&dir).expect("docs/screenshots");
    std::fs::write(dir.join(file), client.screenshot().await.expect("screenshot")).expect("write screenshot");
}

/// Waits until `probe` yields Some, checking every [`PAGE_POLL`]; panics naming `what`
/// after [`PAGE_WAIT`].
async fn wait_for<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + PAGE_WAIT;
    loop {
        if let Ok(Some(v)) = tokio::time::timeout_at(deadline, probe()).await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out after {PAGE_WAIT:?} waiting until {what}");
        tokio::time::sleep(PAGE_POLL).await;
    }
}

/// The text of the first element matching `css`, if there is one.
async fn text_of(client: &Client, css: &str) -> Option<String> {
    client.find(Locator::Css(css)).await.ok()?.text().await.ok()
}

async fn attr_of(client: &Client, css: &str, attr: &str) -> Option<String> {
    client.find(Locator::Css(css)).await.ok()?.attr(attr).await.ok()?
}

async fn sign_in(client: &Client, app: &TestApp, gm: i64, password: &str) {
    client.goto(&format!("{}/console/", app.base_url())).await.expect("open the console");
    let gm_field =
        client.wait().at_most(PAGE_WAIT).for_element(Locator::Id("gm")).await.expect("sign-in form");
    gm_field.send_keys(&gm.to_string()).await.unwrap();
    client.find(Locator::Id("password")).await.unwrap().send_keys(password).await.unwrap();
    client.find(Locator::Id("signin")).await.unwrap().click().await.unwrap();
}

#[tokio::test]
async fn a_gm_signs_in_replies_to_a_legacy_host_and_sees_new_messages_live() {
    let app = spawn_console(&[]).await;
    create_gm_with_password(&app, 7, "Alice", PASSWORD, Role::Gm).await;
    app.add(7, 3, 1001).await;
    app.add(7, 4, 2001).await;
    assert_eq!(app.gs_send(1001, "hello, my item is gone").await.res(), 1);
    app.gs_receive(3).await; // host 3 polls: a legacy host

    with_browser("gm_view", |client| async move {
        // A wrong password is refused on the page.
        sign_in(&client, &app, 7, "not the password").await;
        let notice = wait_for("the sign-in error shows", || async {
            text_of(&client, "#notice").await.filter(|t| !t.is_empty())
        })
        .await;
        assert_eq!(notice, "wrong account or password");
        client.find(Locator::Id("gm")).await.unwrap().clear().await.unwrap();
        client.find(Locator::Id("password")).await.unwrap().clear().await.unwrap();
        sign_in(&client, &app, 7, PASSWORD).await;

        // The roster: players grouped by host, one unread message for 1001.
        let unread = wait_for("player 1001 shows 1 unread", || async {
            text_of(&client, "section.host[data-host='3'] li.player[data-uid='1001'] .unread")
                .await
                .filter(|t| t == "1")
        })
        .await;
        assert_eq!(unread, "1");
        assert!(text_of(&client, "section.host[data-host='4'] li.player[data-uid='2001']").await.is_some());
        wait_for("the live feed is connected", || async {
            attr_of(&client, "#live-state", "data-state").await.filter(|s| s == "live")
        })
        .await;

        // Open the conversation: its history, and the unread count cleared.
        client
            .find(Locator::Css("li.player[data-uid='1001'] button.open"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        wait_for("the history shows the player's message", || async {
            text_of(&client, "#messages li.from-player .text").await.filter(|t| t == "hello, my item is gone")
        })
        .await;
        wait_for("the unread badge is cleared", || async {
            let badge = client.find(Locator::Css("li.player[data-uid='1001'] .unread")).await.ok()?;
            (!badge.is_displayed().await.ok()?).then_some(())
        })
        .await;

        // Reply; the legacy host's poll receives it; the page then shows it taken.
        let reply = client.find(Locator::Id("reply")).await.unwrap();
        reply.send_keys("We restored it, please relog").await.unwrap();
        client.find(Locator::Id("send")).await.unwrap().click().await.unwrap();
        wait_for("the reply shows as accepted", || async {
            attr_of(&client, "#messages li.from-gm .status", "data-status").await
        })
        .await;
        let polled = app.gs_receive(3).await;
        assert_eq!(polled, vec![("1001".to_owned(), vec!["We restored it, please relog".to_owned()])]);
        wait_for("the reply shows as taken by the server", || async {
            attr_of(&client, "#messages li.from-gm .status", "data-status").await.filter(|s| s == "taken")
        })
        .await;

        // The player writes again: it appears without a reload.
        assert_eq!(app.gs_send(1001, "it works now, thanks!").await.res(), 1);
        wait_for("the new message appears live", || async {
            let items = client.find_all(Locator::Css("#messages li.from-player .text")).await.ok()?;
            let last = items.last()?.text().await.ok()?;
            (last == "it works now, thanks!").then_some(())
        })
        .await;
        // Another player's message raises that player's unread count instead.
        assert_eq!(app.gs_send(2001, "hi?").await.res(), 1);
        wait_for("player 2001 shows 1 unread", || async {
            text_of(&client, "li.player[data-uid='2001'] .unread").await.filter(|t| t == "1")
        })
        .await;
        readme_screenshot(&client, "console.png").await;
    })
    .await;
}

#[tokio::test]
async fn the_dashboard_shows_a_hosts_lag_change_live() {
    let app = spawn_console(&[]).await;
    create_gm_with_password(&app, 900, "Ops", PASSWORD, Role::Supervisor).await;
    app.create_gm(7, "Alice").await;
    app.add(7, 3, 1001).await;
    app.add(7, 5, 3001).await;
    app.gs_receive(3).await; // host 3: legacy
    app.gs_receive(5).await; // host 5: legacy

    with_browser("dashboard", |client| async move {
        sign_in(&client, &app, 900, PASSWORD).await;
        // A supervisor who is also a GM lands on the console; the dashboard is one link away.
        client.wait().at_most(PAGE_WAIT).for_element(Locator::Css("#ops-link")).await.unwrap();
        client.goto(&format!("{}/console/ops", app.base_url())).await.unwrap();
        let lag = |host: &'static str| {
            let client = client.clone();
            async move { text_of(&client, &format!("tr[data-host='{host}'] td.lag")).await }
        };
        wait_for("host 3 shows as legacy with no lag", || async {
            let kind = attr_of(&client, "tr[data-host='3']", "data-kind").await?;
            (kind == "legacy" && lag("3").await? == "0").then_some(())
        })
        .await;
        for i in 0..4 {
            assert_eq!(app.gm_send(7, 1001, &format!("message {i}")).await.res(), 1);
        }
        assert_eq!(app.gm_send(7, 3001, "for host 5").await.res(), 1);
        wait_for("host 3's lag shows 4 without a reload", || async { lag("3").await.filter(|l| l == "4") })
            .await;
        assert_eq!(text_of(&client, "#nats").await.unwrap_or_default().split(' ').next(), Some("OK"));
        assert_eq!(text_of(&client, "#redis").await.unwrap_or_default().split(' ').next(), Some("OK"));
        readme_screenshot(&client, "dashboard.png").await;
        app.gs_receive(3).await;
        wait_for("host 3's lag is back to 0", || async { lag("3").await.filter(|l| l == "0") }).await;
        assert_eq!(lag("5").await.as_deref(), Some("1"), "host 5 has not polled");
    })
    .await;
}
