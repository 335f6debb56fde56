//! The web page at `/` in a real browser: headless Chromium driven through chromedriver
//! (WebDriver, with fantoccini). Where neither is installed the test says so and skips; with
//! `DIRACNET_REQUIRE_BROWSER=1` (what `.ci/run` sets) a missing browser fails it instead.
//! `DIRACNET_PAGE_SCREENSHOT=FILE.png` saves what the browser showed.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use fantoccini::{Client as Browser, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};

use crate::{
    common::fixture,
    support::{config, dn18, eventually, free_port, json_of, TestServer},
};

/// The first of `names` found on PATH or as an absolute path.
fn find(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    names.iter().find_map(|name| {
        let direct = Path::new(name);
        if direct.is_absolute() {
            return direct.is_file().then(|| direct.to_path_buf());
        }
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

/// chromedriver and the Chromium it drives, or why they cannot be used.
fn browser() -> Result<(PathBuf, PathBuf), String> {
    let driver = find(&["chromedriver", "/usr/lib/chromium/chromedriver"])
        .ok_or("no chromedriver (Debian: apt-get install chromium-driver)")?;
    let chromium = find(&["chromium", "chromium-browser", "google-chrome"])
        .ok_or("no Chromium (Debian: apt-get install chromium)")?;
    Ok((driver, chromium))
}

/// A chromedriver child process, killed when dropped.
struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts chromedriver on 127.0.0.1 and opens a headless Chromium session through it; `None`
/// (after printing why) when no browser is installed and none is required.
async fn open_browser() -> Option<(Driver, Browser)> {
    let required = std::env::var_os("DIRACNET_REQUIRE_BROWSER").is_some_and(|v| v != "0");
    let (driver, chromium) = match browser() {
        Ok(found) => found,
        Err(why) => {
            assert!(!required, "DIRACNET_REQUIRE_BROWSER is set, but {why}");
            println!("SKIPPED: the browser test ({why})");
            return None;
        }
    };
    let port = free_port();
    let child = Command::new(&driver)
        .args([format!("--port={port}"), "--allowed-ips=127.0.0.1".into()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", driver.display()));
    let driver = Driver(child);
    let status = format!("http://127.0.0.1:{port}/status");
    eventually(|| {
        let status = status.clone();
        async move {
            reqwest::get(status)
                .await
                .is_ok_and(|r| r.status().is_success())
        }
    })
    .await;
    let caps = json!({
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": chromium,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=900,1100", "--no-first-run", "--no-default-browser-check"],
        },
    });
    let Value::Object(caps) = caps else {
        unreachable!()
    };
    let session = ClientBuilder::new(HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .expect("a Chromium session through chromedriver");
    Some((driver, session))
}

/// The top-1 label the API gives `image` (raw body).
async fn api_top1(server: &TestServer, image: &Path, key: Option<&str>) -> String {
    let mut request = Client::new()
        .post(server.url("/classify"))
        .header("content-type", "image/jpeg")
        .body(std::fs::read(image).unwrap());
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let (status, _, v) = json_of(request.send().await.unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    v["predictions"][0]["label"].as_str().unwrap().to_string()
}

/// Picks `image` in the page's file input and waits for the top-5 list.
async fn upload(page: &Browser, image: &Path) -> Vec<String> {
    let input = page.find(Locator::Css("#file")).await.unwrap();
    input.send_keys(image.to_str().unwrap()).await.unwrap();
    page.wait()
        .at_most(Duration::from_secs(60))
        .for_element(Locator::Css("#results .prediction .label"))
        .await
        .expect("the page showed no predictions");
    let mut labels = Vec::new();
    for e in page
        .find_all(Locator::Css("#results .prediction .label"))
        .await
        .unwrap()
    {
        labels.push(e.text().await.unwrap());
    }
    labels
}

async fn text_of(page: &Browser, css: &str) -> String {
    page.find(Locator::Css(css))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_classifies_an_uploaded_image_in_a_real_browser() {
    let Some((_driver, page)) = open_browser().await else {
        return;
    };
    let server = TestServer::start(|cache| {
        let mut cfg = config(&[&dn18()], cache);
        cfg.api_key = Some("s3cret".into());
        cfg
    })
    .await;
    let image = fixture("images/chelsea.jpg");
    let want = api_top1(&server, &image, Some("s3cret")).await;

    page.goto(&server.url("/")).await.unwrap();
    assert_eq!(page.title().await.unwrap(), "diracnet: classify an image");
    // Without the key: the server's 401, and what to do about it.
    let input = page.find(Locator::Css("#file")).await.unwrap();
    input.send_keys(image.to_str().unwrap()).await.unwrap();
    let status = page.find(Locator::Css("#status.error")).await;
    let status = match status {
        Ok(s) => s,
        Err(_) => page
            .wait()
            .at_most(Duration::from_secs(30))
            .for_element(Locator::Css("#status.error"))
            .await
            .unwrap(),
    };
    let said = status.text().await.unwrap();
    assert!(
        said.starts_with("401") && said.contains("API key"),
        "{said}"
    );

    // With the key (typed, then the next upload): the top 5 as the API ranks them, labelled,
    // with the server's timings.
    page.find(Locator::Css("#key"))
        .await
        .unwrap()
        .send_keys("s3cret")
        .await
        .unwrap();
    let labels = upload(&page, &image).await;
    assert_eq!(labels.len(), 5, "{labels:?}");
    assert_eq!(labels[0], want, "the page's top-1 is not the API's");
    let scores: Vec<f64> = {
        let mut v = Vec::new();
        for e in page
            .find_all(Locator::Css("#results .score"))
            .await
            .unwrap()
        {
            let t = e.text().await.unwrap();
            v.push(t.trim_end_matches(" %").parse().unwrap());
        }
        v
    };
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");
    let timing = text_of(&page, "#timing").await;
    assert!(
        timing.contains("inference") && timing.contains(" ms"),
        "{timing}"
    );
    assert!(
        text_of(&page, "#status").await.contains("chelsea.jpg"),
        "the status names the file"
    );
    // One model: no model picker.
    let picker = page.find(Locator::Css("#model-row")).await.unwrap();
    assert!(!picker.is_displayed().await.unwrap());

    if let Some(path) = std::env::var_os("DIRACNET_PAGE_SCREENSHOT") {
        std::fs::write(&path, page.screenshot().await.unwrap()).unwrap();
        println!("screenshot: {}", PathBuf::from(path).display());
    }
    page.close().await.unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_offers_a_model_picker_when_several_models_are_served() {
    let Some((_driver, page)) = open_browser().await else {
        return;
    };
    let small = format!(
        "small={}",
        fixture("models/dn34c10_checkpoint.pth").display()
    );
    let server = TestServer::start(|cache| config(&[&dn18(), &small], cache)).await;
    page.goto(&server.url("/")).await.unwrap();
    let picker = page
        .wait()
        .at_most(Duration::from_secs(30))
        .for_element(Locator::Css("#model option[value=small]"))
        .await
        .unwrap();
    picker.click().await.unwrap();
    assert!(page
        .find(Locator::Css("#model-row"))
        .await
        .unwrap()
        .is_displayed()
        .await
        .unwrap());
    // The 10-class model has no labels: the page names the class index.
    let labels = upload(&page, &fixture("images/chelsea.jpg")).await;
    assert_eq!(labels.len(), 5);
    assert!(labels.iter().all(|l| l.starts_with("class ")), "{labels:?}");
    assert!(text_of(&page, "#status").await.contains("small"));
    page.close().await.unwrap();
    server.stop().await;
}

/// Swagger UI's "Try it out" uploads a file to `/classify` (the OpenAPI declares binary bodies),
/// in the same browser.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swagger_ui_uploads_an_image_with_try_it_out() {
    let Some((_driver, page)) = open_browser().await else {
        return;
    };
    let server = TestServer::start(|cache| config(&[&dn18()], cache)).await;
    let image = fixture("images/chelsea.jpg");
    let want = api_top1(&server, &image, None).await;
    page.goto(&server.url("/docs/")).await.unwrap();
    let wait = |css: &'static str| {
        let page = page.clone();
        async move {
            page.wait()
                .at_most(Duration::from_secs(30))
                .for_element(Locator::Css(css))
                .await
                .unwrap_or_else(|e| panic!("Swagger UI: no {css}: {e}"))
        }
    };
    wait("#operations-classify-classify .opblock-summary")
        .await
        .click()
        .await
        .unwrap();
    wait("#operations-classify-classify .try-out__btn")
        .await
        .click()
        .await
        .unwrap();
    // The request body's media type: a raw image file.
    wait("#operations-classify-classify .opblock-section-request-body select option[value='image/*']")
        .await
        .click()
        .await
        .unwrap();
    wait("#operations-classify-classify .opblock-section-request-body input[type=file]")
        .await
        .send_keys(image.to_str().unwrap())
        .await
        .unwrap();
    wait("#operations-classify-classify button.execute")
        .await
        .click()
        .await
        .unwrap();
    let body =
        wait("#operations-classify-classify .live-responses-table .response-col_description pre")
            .await
            .text()
            .await
            .unwrap();
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(
        v["predictions"][0]["label"].as_str(),
        Some(want.as_str()),
        "{v}"
    );
    page.close().await.unwrap();
    server.stop().await;
}
