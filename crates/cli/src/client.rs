//! The CLI's HTTP client for the broker's API.

use serde::de::DeserializeOwned;
use serde_json::Value;

#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    token: Option<String>,
    /// Where the admin token was looked for, to say so when the broker wants one.
    data: std::path::PathBuf,
    http: reqwest::Client,
}

/// The data folder when `--data` is not given: `.respawn` in the working directory
/// or the nearest parent that has one (as git finds `.git`), else `./.respawn`.
pub fn find_data_folder() -> std::path::PathBuf {
    let here = std::path::PathBuf::from(".respawn");
    let Ok(cwd) = std::env::current_dir() else {
        return here;
    };
    cwd.ancestors()
        .map(|d| d.join(".respawn"))
        .find(|d| d.is_dir())
        .unwrap_or(here)
}

/// The token to call with: `--token` / `RESPAWN_TOKEN`, else the admin token of the
/// local data folder, else `~/.config/respawn/token`.
pub fn resolve_token(flag: Option<String>, data: &std::path::Path) -> Option<String> {
    let read = |p: std::path::PathBuf| std::fs::read_to_string(p).ok().map(|s| s.trim().to_owned());
    flag.filter(|t| !t.is_empty())
        .or_else(|| read(crate::up::api::admin_token_path(data)))
        .or_else(|| {
            let home = std::env::var_os("HOME")?;
            read(std::path::Path::new(&home).join(".config/respawn/token"))
        })
}

impl Client {
    pub fn new(endpoint: &str, token: Option<String>, data: &std::path::Path) -> Self {
        Client {
            base: endpoint.trim_end_matches('/').to_owned(),
            token,
            data: data.to_owned(),
            http: reqwest::Client::new(),
        }
    }

    fn auth(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn decode<T: DeserializeOwned>(
        &self,
        resp: Result<reqwest::Response, reqwest::Error>,
    ) -> Result<T, String> {
        let resp = resp.map_err(|e| {
            format!(
                "cannot reach the broker at {} ({e}); is `respawn up` running?",
                self.base
            )
        })?;
        let status = resp.status();
        let body: Value = resp
            .json()
            .await
            .map_err(|e| format!("unreadable answer ({status}): {e}"))?;
        if status.is_success() {
            serde_json::from_value(body).map_err(|e| format!("unexpected answer: {e}"))
        } else if status == reqwest::StatusCode::UNAUTHORIZED && self.token.is_none() {
            Err(format!(
                "{}\nno API token found: `respawn up` keeps its admin token in {} (run this from the \
                 project folder or below it, or pass --data), or pass --token / set RESPAWN_TOKEN",
                describe_error(&body),
                crate::up::api::admin_token_path(&self.data).display()
            ))
        } else {
            Err(describe_error(&body))
        }
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, String> {
        self.decode(self.auth(self.http.get(self.url(path))).send().await)
            .await
    }

    pub async fn post_text<T: DeserializeOwned>(
        &self,
        path: &str,
        body: String,
    ) -> Result<T, String> {
        self.decode(
            self.auth(self.http.post(self.url(path)))
                .body(body)
                .send()
                .await,
        )
        .await
    }

    pub async fn post_json<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &Value,
    ) -> Result<T, String> {
        self.decode(
            self.auth(self.http.post(self.url(path)))
                .json(body)
                .send()
                .await,
        )
        .await
    }
}

fn describe_error(body: &Value) -> String {
    let mut out = body["error"]
        .as_str()
        .unwrap_or("request failed")
        .to_owned();
    if let Some(errors) = body["errors"].as_array() {
        for e in errors {
            let path = e["path"].as_str().unwrap_or_default();
            let msg = e["message"].as_str().unwrap_or_default();
            out.push_str(&format!("\n  {path}: {msg}"));
        }
    }
    out
}

impl Client {
    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, String> {
        self.decode(self.auth(self.http.delete(self.url(path))).send().await)
            .await
    }
}
