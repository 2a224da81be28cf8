//! The bench's own HTTP client for latency, time to last byte and SSE event
//! timing: one keep-alive connection per target, a Claude Code-shaped
//! request, every answer checked and read to its end.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use futures_util::StreamExt;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

/// Where requests go and with which key (the relay's `sk-proxy-…` or the
/// fake's upstream key).
#[derive(Clone)]
pub struct Endpoint {
    pub label: &'static str,
    pub base_url: String,
    pub api_key: String,
}

pub const PATH: &str = "/v1/messages?beta=true";

/// The headers Claude Code sends (from a captured request), without the key.
pub fn claude_code_headers() -> Vec<(String, String)> {
    [
        ("accept", "application/json"),
        ("content-type", "application/json"),
        ("user-agent", "claude-cli/2.1.330 (external, sdk-cli)"),
        (
            "x-claude-code-session-id",
            "6e94c738-f67a-4561-afbb-d7fca9ddcb51",
        ),
        ("x-stainless-lang", "js"),
        ("x-stainless-package-version", "0.128.0"),
        ("x-stainless-retry-count", "0"),
        ("x-stainless-timeout", "600"),
        (
            "anthropic-beta",
            "claude-code-20250219,interleaved-thinking-2025-05-14,context-management-2025-06-27,effort-2025-11-24",
        ),
        ("anthropic-version", "2023-06-01"),
        ("x-app", "cli"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

/// A small Claude Code turn (about 2 KB): system prompt blocks, a reminder
/// and the user's message; `max_tokens` 12 keeps the fake's answer short.
pub fn request_body(stream: bool) -> String {
    let instructions = "You are an interactive CLI tool that helps users with software engineering tasks. \
        Use the instructions below and the tools available to you to assist the user. \
        IMPORTANT: Assist with defensive security tasks only. Refuse to create, modify, or improve code that may be used maliciously. \
        When the user asks about Claude Code, use the WebFetch tool to gather information. \
        You should be concise, direct, and to the point. When you run a non-trivial bash command, you should explain what the command does and why you are running it. \
        Your output will be displayed on a command line interface. Your responses can use Github-flavored markdown for formatting. \
        Only use emojis if the user explicitly requests it. Avoid using emojis in all communication unless asked. \
        When making changes to files, first understand the file's code conventions. Mimic code style, use existing libraries and utilities, and follow existing patterns.";
    let body = serde_json::json!({
        "model": "claude-sonnet-4-5-20250929",
        "messages": [{
            "role": "user",
            "content": [
                {"type": "text", "text": "<system-reminder>\nAs you answer the user's questions, you can use the following context:\n# important-instruction-reminders\nDo what has been asked; nothing more, nothing less.\n</system-reminder>\n"},
                {"type": "text", "text": "The test `parser::tests::handles_crlf` fails after my last change to src/parser.rs. Find out why and fix it.", "cache_control": {"type": "ephemeral"}}
            ]
        }],
        "system": [
            {"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude.", "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": instructions, "cache_control": {"type": "ephemeral"}}
        ],
        "metadata": {"user_id": "user_2f6c1e0c9f1d4b7f8a3e_account__session_6e94c738-f67a-4561-afbb-d7fca9ddcb51"},
        "max_tokens": 12,
        "stream": stream
    });
    body.to_string()
}

pub struct Client {
    http: reqwest::Client,
    headers: HeaderMap,
    json_body: Bytes,
    stream_body: Bytes,
}

impl Client {
    pub fn new() -> anyhow::Result<Client> {
        let mut headers = HeaderMap::new();
        for (name, value) in claude_code_headers() {
            headers.insert(
                HeaderName::from_bytes(name.as_bytes())?,
                HeaderValue::from_str(&value)?,
            );
        }
        let http = reqwest::Client::builder()
            .no_proxy()
            .tcp_nodelay(true)
            .pool_max_idle_per_host(64)
            .timeout(Duration::from_secs(30))
            .build()?;
        Ok(Client {
            http,
            headers,
            json_body: Bytes::from(request_body(false)),
            stream_body: Bytes::from(request_body(true)),
        })
    }

    pub fn body_len(&self) -> usize {
        self.json_body.len()
    }

    async fn post(&self, to: &Endpoint, stream: bool) -> anyhow::Result<reqwest::Response> {
        let body = if stream {
            self.stream_body.clone()
        } else {
            self.json_body.clone()
        };
        let response = self
            .http
            .post(format!("{}{PATH}", to.base_url))
            .headers(self.headers.clone())
            .header("x-api-key", &to.api_key)
            .body(body)
            .send()
            .await
            .with_context(|| format!("POST {PATH} to {}", to.label))?;
        if response.status() != reqwest::StatusCode::OK {
            let status = response.status();
            let text = response.text().await.unwrap_or_default();
            bail!(
                "{} answered {status}: {}",
                to.label,
                text.chars().take(300).collect::<String>()
            );
        }
        Ok(response)
    }

    /// One non-streamed request, start to last byte, in milliseconds.
    pub async fn json(&self, to: &Endpoint) -> anyhow::Result<f64> {
        let started = Instant::now();
        let body = self.post(to, false).await?.bytes().await?;
        let elapsed = started.elapsed();
        if !body.windows(7).any(|w| w == b"\"usage\"") {
            bail!("{} answered 200 without usage", to.label);
        }
        Ok(ms(elapsed))
    }

    /// One streamed request, start to last byte, in milliseconds.
    pub async fn stream(&self, to: &Endpoint) -> anyhow::Result<f64> {
        let started = Instant::now();
        let mut body = self.post(to, true).await?.bytes_stream();
        let mut last = Vec::new();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.with_context(|| format!("reading {}'s stream", to.label))?;
            last.clear();
            last.extend_from_slice(&chunk[chunk.len().saturating_sub(64)..]);
        }
        let elapsed = started.elapsed();
        if !last.windows(12).any(|w| w == b"message_stop") {
            bail!("{}'s stream did not end with message_stop", to.label);
        }
        Ok(ms(elapsed))
    }

    /// One streamed request: each SSE event's arrival (ms after the
    /// response headers) and, for the fake's `sent_at_us` stamps, each
    /// stamp's delay from the fake's write to this client (ms, same machine,
    /// same clock).
    pub async fn event_arrivals(&self, to: &Endpoint) -> anyhow::Result<EventTimes> {
        let response = self.post(to, true).await?;
        let headers_at = Instant::now();
        let mut body = response.bytes_stream();
        let mut pending: Vec<u8> = Vec::new();
        let mut times = EventTimes::default();
        while let Some(chunk) = tokio::time::timeout(Duration::from_secs(10), body.next())
            .await
            .with_context(|| format!("{}'s stream stalled", to.label))?
        {
            let chunk = chunk.with_context(|| format!("reading {}'s stream", to.label))?;
            let at = ms(headers_at.elapsed());
            let now_us = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_micros();
            pending.extend_from_slice(&chunk);
            while let Some(end) = pending.windows(2).position(|w| w == b"\n\n") {
                let block = &pending[..end];
                match block.strip_prefix(b": sent_at_us ") {
                    Some(stamp) => {
                        let sent_us: u128 = std::str::from_utf8(stamp)?.trim().parse()?;
                        times
                            .stamp_delays
                            .push(now_us.saturating_sub(sent_us) as f64 / 1000.0);
                    }
                    None => times.arrivals.push(at),
                }
                pending.drain(..end + 2);
            }
        }
        Ok(times)
    }
}

#[derive(Debug, Default)]
pub struct EventTimes {
    pub arrivals: Vec<f64>,
    pub stamp_delays: Vec<f64>,
}

pub fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_body_is_claude_code_shaped_json() {
        let body: serde_json::Value = serde_json::from_str(&request_body(true)).unwrap();
        assert_eq!(body["stream"], true);
        assert_eq!(body["max_tokens"], 12);
        assert!(request_body(false).len() > 1500);
    }
}
