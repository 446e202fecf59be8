//! A reader of `text/event-stream` responses over a real HTTP client, parsing events as a browser's
//! EventSource does.

use futures_util::StreamExt;
use serde_json::Value;

/// One event (or comment) as a browser's EventSource would parse it.
#[derive(Debug, Default)]
pub struct Event {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: Value,
    pub comment: Option<String>,
}

/// A reader of a `text/event-stream` response.
pub struct Stream {
    pub response: awc::ClientResponse<
        actix_http::encoding::Decoder<actix_http::Payload<actix_http::BoxedPayloadStream>>,
    >,
    buf: Vec<u8>,
}

impl Stream {
    /// Opens `url` with extra headers; the status and JSON body when it is refused.
    pub async fn open(url: &str, headers: &[(&str, &str)]) -> Result<Stream, (u16, Value)> {
        let client = awc::Client::builder().disable_timeout().finish();
        let mut request = client.get(url);
        for (k, v) in headers {
            request = request.insert_header((*k, *v));
        }
        let mut response = request.send().await.expect("GET /sse");
        if response.status() != 200 {
            let body = response.body().await.expect("body");
            return Err((
                response.status().as_u16(),
                serde_json::from_slice(&body).unwrap_or(Value::Null),
            ));
        }
        assert_eq!(
            response.headers().get("content-type").unwrap(),
            "text/event-stream"
        );
        Ok(Stream {
            response,
            buf: Vec::new(),
        })
    }

    /// The next event or comment; `None` when the stream ended.
    pub async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buf.drain(..end + 2).collect();
                let text = String::from_utf8(block).expect("UTF-8");
                let mut event = Event::default();
                for line in text.lines() {
                    if let Some(c) = line.strip_prefix(':') {
                        event.comment = Some(c.trim().to_string());
                    } else if let Some(v) = line.strip_prefix("id: ") {
                        event.id = Some(v.to_string());
                    } else if let Some(v) = line.strip_prefix("event: ") {
                        event.event = Some(v.to_string());
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        event.data = serde_json::from_str(v).expect("data is JSON");
                    }
                }
                return Some(event);
            }
            let chunk = tokio::time::timeout(super::FRAME_TIMEOUT, self.response.next())
                .await
                .expect("the stream went quiet");
            match chunk {
                Some(chunk) => self.buf.extend_from_slice(&chunk.expect("chunk")),
                None => return None,
            }
        }
    }

    /// Reads until every channel named is live (the `: subscribed <channel>` comments).
    pub async fn subscribed(&mut self, channels: &[&str]) {
        let mut waiting: Vec<&str> = channels.to_vec();
        while !waiting.is_empty() {
            let event = self.next().await.expect("the stream ended");
            let comment = event
                .comment
                .unwrap_or_else(|| panic!("an event first: {:?}", event.data));
            if let Some(channel) = comment.strip_prefix("subscribed ") {
                waiting.retain(|c| *c != channel);
            }
        }
    }

    /// The next event that is not a comment.
    pub async fn event(&mut self) -> Event {
        loop {
            let event = self.next().await.expect("the stream ended");
            if event.comment.is_none() {
                return event;
            }
        }
    }
}
