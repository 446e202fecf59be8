//! Every text a WebSocket client can send goes through `parse_client_frame`: it must never panic, and what the
//! hub answers from it must be well-formed JSON carrying back the client's own id and channel, whatever bytes
//! they hold (the answers are written by hand, not by serde, so their escaping is what is under test).
#![no_main]

use libfuzzer_sys::fuzz_target;
use relayhub::protocol::{self, ClientFrame};
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = protocol::parse_client_frame(text);
    let answer = match &parsed.frame {
        Ok(ClientFrame::Subscribe { channel, .. }) | Ok(ClientFrame::Unsubscribe { channel }) => {
            let _ = protocol::parse_target(channel);
            let answer = protocol::subscribed_frame(&parsed.id, channel);
            let json: Value = serde_json::from_str(&answer).expect("a subscribed frame is JSON");
            assert_eq!(json["channel"].as_str(), Some(channel.as_str()));
            answer
        }
        Ok(ClientFrame::Publish { channel, .. }) => {
            protocol::published_frame(&parsed.id, channel, Some(1))
        }
        Ok(ClientFrame::Presence { channel }) => {
            // The channel doubles as a member's id and user: both are written by hand too.
            let member = protocol::member_json(channel, Some(channel), None);
            let answer = protocol::presence_frame(&parsed.id, channel, &[member], true);
            let json: Value = serde_json::from_str(&answer).expect("a presence frame is JSON");
            assert_eq!(json["channel"].as_str(), Some(channel.as_str()));
            assert_eq!(json["members"][0]["user"].as_str(), Some(channel.as_str()));
            answer
        }
        Ok(ClientFrame::Ping) => protocol::pong_frame(&parsed.id),
        Ok(ClientFrame::Auth { token }) => {
            protocol::authed_frame(&parsed.id, token, "2026-01-01T00:00:00Z")
        }
        Err(error) => protocol::error_frame(&parsed.id, error),
    };
    let json: Value = serde_json::from_str(&answer).expect("every answer is JSON");
    if let Some(id) = &parsed.id {
        let sent: Value = serde_json::from_str(id.get()).expect("an accepted id is JSON");
        assert_eq!(json["id"], sent, "the answer carries the request's id");
    }
});
