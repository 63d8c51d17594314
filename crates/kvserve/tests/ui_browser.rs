//! The web page in a real browser: headless Chromium (Debian's `chromium`
//! and `chromium-driver`, installed by `.ci/run`) driven over WebDriver
//! (`fantoccini`), against `kvserve serve` on the default model. Fails, not
//! skips, without them. Screenshots of each state land in
//! `target/tmp/ui-screenshots/`.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, get, serve_with};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

/// A chromedriver process, killed when dropped.
struct Driver {
    child: Child,
    port: u16,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_driver() -> Driver {
    let port = free_port();
    let child = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver runs (Debian's chromium-driver; .ci/run installs it)");
    let driver = Driver { child, port };
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "chromedriver did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    driver
}

async fn browser(driver: &Driver) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1400,1000", "--no-first-run"],
        }),
    );
    caps.insert("goog:loggingPrefs".into(), json!({"browser": "ALL"}));
    let mut builder = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new());
    builder.capabilities(caps);
    builder.connect(&format!("http://127.0.0.1:{}", driver.port)).await.expect("a browser session")
}

fn shots_dir() -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("ui-screenshots");
    std::fs::create_dir_all(&dir).expect("a screenshot folder");
    dir
}

async fn screenshot(c: &Client, name: &str) {
    let png = c.screenshot().await.expect("a screenshot");
    std::fs::write(shots_dir().join(format!("{name}.png")), png).expect("saved");
}

fn by_id(id: &str) -> String {
    format!("[data-testid=\"{id}\"]")
}

/// Runs `script` (a function body) until it returns a truthy value, or
/// fails after `limit` with `what`.
async fn wait_js(c: &Client, script: &str, limit: Duration, what: &str) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let v = c.execute(script, vec![]).await.expect("script runs");
        if !(v.is_null() || v == json!(false) || v == json!(0) || v == json!("")) {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The browser's console entries of level SEVERE (errors, failed loads).
async fn console_errors(c: &Client, driver: &Driver) -> Vec<Value> {
    let session = c.session_id().await.expect("a session").expect("an id");
    let url = format!("http://127.0.0.1:{}/session/{session}/se/log", driver.port);
    let response = reqwest::Client::new().post(url).json(&json!({"type": "browser"})).send().await.expect("the log");
    let logs: Value = response.json().await.expect("JSON");
    let entries = logs["value"].as_array().unwrap_or_else(|| panic!("chromedriver's log: {logs}"));
    entries.iter().filter(|e| e["level"] == "SEVERE").cloned().collect()
}

async fn send_message(c: &Client, text: &str) {
    let input = c.find(Locator::Css(&by_id("chat-input"))).await.expect("the chat input");
    input.send_keys(text).await.expect("typed");
    // Enter sends (Shift+Enter would add a line).
    input.send_keys("\u{E007}").await.expect("enter");
}

async fn wait_answers(c: &Client, n: usize) {
    let script = format!("return document.querySelectorAll('[data-testid=\"answer-stats\"]').length >= {n};");
    wait_js(c, &script, Duration::from_secs(120), &format!("answer {n}")).await;
}

/// Chat, cache view, stop and hostile text on an open server.
#[tokio::test(flavor = "multi_thread")]
async fn the_page_chats_shows_the_cache_stops_and_renders_hostile_text_as_text() {
    let driver = start_driver();
    let cache = tempfile::tempdir().expect("a temp dir");
    let server = serve_with(cache.path(), &[]);
    let url = format!("http://{}/", server.addr);
    let c = browser(&driver).await;

    let started = Instant::now();
    c.goto(&url).await.expect("the page loads");
    wait_js(
        &c,
        "return document.querySelector('[data-testid=\"model-name\"]').textContent;",
        Duration::from_secs(10),
        "the first poll",
    )
    .await;
    let load = c
        .execute(
            "const n = performance.getEntriesByType('navigation')[0]; return n.loadEventEnd - n.startTime;",
            vec![],
        )
        .await
        .expect("timing");
    println!("first load: {load} ms in the browser, {:?} to the first poll", started.elapsed());
    screenshot(&c, "1-loaded").await;
    let stop = c.find(Locator::Css(&by_id("chat-stop"))).await.expect("the stop button is always there");
    assert_eq!(stop.attr("disabled").await.expect("attr").as_deref(), Some("true"), "disabled while idle");

    // A turn streams an answer; the second turn of the same agent is served
    // from its cache.
    send_message(&c, "What is the capital of France? Answer in one sentence.").await;
    wait_answers(&c, 1).await;
    let answer =
        c.find(Locator::Css("[data-testid=\"chat-message\"][data-role=\"assistant\"]")).await.expect("an answer");
    let text = answer.text().await.expect("its text");
    assert!(text.contains("Paris"), "{text}");
    screenshot(&c, "2-first-answer").await;
    send_message(&c, "And what is the capital of Italy?").await;
    wait_answers(&c, 2).await;
    let stats = c.find_all(Locator::Css(&by_id("answer-stats"))).await.expect("stats");
    let cached: usize =
        stats[1].attr("data-cached-tokens").await.expect("attr").expect("set").parse().expect("a number");
    assert!(cached > 0, "the second turn is served from the agent's cache");
    let agent = c
        .find(Locator::Css(&by_id("agent-id")))
        .await
        .expect("the agent id")
        .prop("value")
        .await
        .expect("value")
        .expect("set");
    assert!(agent.starts_with("web-"), "{agent}");
    let row = format!("[data-testid=\"agents-table\"] [data-testid=\"agent-row\"][data-agent-id=\"{agent}\"]");
    wait_js(
        &c,
        &format!("return document.querySelector('{}') !== null;", row.replace('\'', "\\'")),
        Duration::from_secs(5),
        "the agent's row",
    )
    .await;
    let tiers = c.find(Locator::Css(&by_id("tier-stats"))).await.expect("tier stats").text().await.expect("text");
    assert!(tiers.contains("ram") && tiers.contains("disk"), "{tiers}");
    screenshot(&c, "3-cached-second-turn").await;

    // Stop cancels: the answer stops, the server counts a cancelled request.
    c.find(Locator::Css(".settings summary")).await.expect("settings").click().await.expect("opened");
    let max = c.find(Locator::Css(&by_id("max-tokens"))).await.expect("max tokens");
    max.clear().await.expect("cleared");
    max.send_keys("2000").await.expect("typed");
    send_message(&c, "Count from 1 to 1000, separated by commas.").await;
    wait_js(
        &c,
        "const s = document.querySelector('[data-testid=\"chat-stop\"]'); \
         const m = document.querySelectorAll('[data-role=\"assistant\"]'); \
         return !s.disabled && m[m.length - 1].textContent.length > 10;",
        Duration::from_secs(60),
        "a streaming answer",
    )
    .await;
    c.find(Locator::Css(&by_id("chat-stop"))).await.expect("stop").click().await.expect("clicked");
    wait_answers(&c, 3).await;
    let last = c.find_all(Locator::Css(&by_id("answer-stats"))).await.expect("stats").pop().expect("three");
    assert!(last.text().await.expect("text").contains("stopped"));
    assert_eq!(stop.attr("disabled").await.expect("attr").as_deref(), Some("true"), "disabled again");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = get(&server.addr, "/metrics");
        if common::metric(&metrics, "kvserve_requests_finished_total{reason=\"cancelled\"}").unwrap_or(0.0) >= 1.0 {
            break;
        }
        assert!(Instant::now() < deadline, "the server did not cancel the stopped request: {metrics}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    screenshot(&c, "4-stopped").await;

    // Hostile text: the model asked to repeat markup, the user's own
    // message, and the renderer on its own.
    c.find(Locator::Css(&by_id("new-chat"))).await.expect("new").click().await.expect("clicked");
    let system = c.find(Locator::Css(&by_id("system-prompt"))).await.expect("system");
    system.clear().await.expect("cleared");
    system.send_keys("You repeat texts exactly, word for word.").await.expect("typed");
    send_message(
        &c,
        "Repeat this text exactly: <img src=x onerror=window.pwned=1> and <script>window.pwned=2</script>",
    )
    .await;
    wait_answers(&c, 1).await;
    let hostile = c
        .execute(
            "const m = document.querySelector('[data-testid=\"chat-messages\"]'); \
             return {elements: m.querySelectorAll('img, script, iframe, [onerror]').length, \
                     pwned: window.pwned === undefined ? null : window.pwned, \
                     answer: m.querySelector('[data-role=\"assistant\"] .body').textContent};",
            vec![],
        )
        .await
        .expect("script");
    assert_eq!(hostile["elements"], 0, "{hostile}");
    assert_eq!(hostile["pwned"], Value::Null, "{hostile}");
    println!("the model's answer to the markup: {}", hostile["answer"]);
    let rendered = c
        .execute(
            "const out = []; \
             for (const s of arguments[0]) { const d = document.createElement('div'); d.append(window.kvserveRender(s)); \
               const bad = Array.from(d.querySelectorAll('*')).filter(e => !['P','BR','CODE','PRE','STRONG','EM','UL','OL','LI','H3','H4','H5','H6'].includes(e.tagName) || Array.from(e.attributes).some(a => a.name !== 'data-lang')); \
               out.push({text: d.textContent, bad: bad.map(e => e.outerHTML)}); } \
             return out;",
            vec![json!([
                "<img src=x onerror=alert(1)>",
                "**<script>alert(1)</script>**",
                "```html\n<iframe src=javascript:alert(1)></iframe>\n```",
                "`<svg onload=alert(1)>` and *<a href=javascript:alert(1)>x</a>*",
                "# <b onmouseover=alert(1)>title</b>\n- <img src=x>\n1. \"'><script>",
                "[link](javascript:alert(1)) &lt;img&gt; &amp;",
            ])],
        )
        .await
        .expect("script");
    for r in rendered.as_array().expect("a list") {
        assert_eq!(r["bad"], json!([]), "{rendered}");
    }
    assert!(rendered[0]["text"].as_str().expect("text").contains("<img src=x onerror=alert(1)>"), "shown as text");
    assert!(rendered[5]["text"].as_str().expect("text").contains("&lt;img&gt;"), "entities stay text");
    screenshot(&c, "5-hostile-text").await;

    let errors = console_errors(&c, &driver).await;
    assert!(errors.is_empty(), "console errors: {errors:?}");
    c.close().await.expect("closed");
}

/// With API keys, the page asks for one before anything else, and with it
/// shows that tenant's view.
#[tokio::test(flavor = "multi_thread")]
async fn with_keys_the_page_asks_for_one() {
    let driver = start_driver();
    let cache = tempfile::tempdir().expect("a temp dir");
    let server = serve_with(cache.path(), &["--api-key", "open-sesame:alice", "--metrics-key", "scrape-metrics"]);
    let c = browser(&driver).await;
    c.goto(&format!("http://{}/", server.addr)).await.expect("the page loads");
    wait_js(
        &c,
        "return !document.querySelector('[data-testid=\"key-prompt\"]').hidden;",
        Duration::from_secs(10),
        "the key prompt",
    )
    .await;
    screenshot(&c, "6-key-prompt").await;
    c.find(Locator::Css(&by_id("key-input"))).await.expect("input").send_keys("open-sesame").await.expect("typed");
    c.find(Locator::Css(&by_id("key-submit"))).await.expect("submit").click().await.expect("clicked");
    wait_js(&c, "return document.querySelector('[data-testid=\"key-prompt\"]').hidden && document.querySelector('[data-testid=\"model-name\"]').textContent;", Duration::from_secs(10), "the view with the key").await;
    // The tenant's key is not the metrics key: its own agents, no
    // server-wide numbers.
    let notice = c.find(Locator::Css(&by_id("cache-notice"))).await.expect("notice").text().await.expect("text");
    assert!(notice.contains("metrics key"), "{notice}");
    screenshot(&c, "7-keyed-view").await;
    c.close().await.expect("closed");
}
