//! The CLI's HTTP client for the broker's API.

use serde::de::DeserializeOwned;
use serde_json::Value;

#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    http: reqwest::Client,
}

impl Client {
    pub fn new(endpoint: &str) -> Self {
        Client {
            base: endpoint.trim_end_matches('/').to_owned(),
            http: reqwest::Client::new(),
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
        } else {
            Err(describe_error(&body))
        }
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, String> {
        self.decode(self.http.get(self.url(path)).send().await)
            .await
    }

    pub async fn post_text<T: DeserializeOwned>(
        &self,
        path: &str,
        body: String,
    ) -> Result<T, String> {
        self.decode(self.http.post(self.url(path)).body(body).send().await)
            .await
    }

    pub async fn post_json<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &Value,
    ) -> Result<T, String> {
        self.decode(self.http.post(self.url(path)).json(body).send().await)
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
