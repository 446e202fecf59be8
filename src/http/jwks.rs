//! Keeps the JWKS of `auth.jwks_url` fresh: one fetch at start, then one every `auth.jwks_refresh_interval`
//! and whenever a token names a `kid` the cached set lacks (asked for through the verifier, which spaces those
//! asks by `auth.jwks_min_refresh_interval`). Each fetch is bounded by `auth.jwks_timeout` and
//! `auth.jwks_max_bytes`; a failed one keeps the keys held before.

use std::sync::Arc;

use crate::core::config::AuthConfig;
use crate::core::token::{Jwks, Verifier};
use crate::stats::Stats;

/// Fetches the JWKS once and installs it; the number of keys held, or what went wrong.
pub async fn fetch_once(jwks: &Jwks, auth: &AuthConfig) -> Result<usize, String> {
    let client = awc::Client::builder().timeout(auth.jwks_timeout).finish();
    let fetch = async {
        let mut response = client
            .get(&auth.jwks_url)
            .insert_header(("Accept", "application/json"))
            .send()
            .await
            .map_err(|e| format!("cannot fetch {}: {e}", auth.jwks_url))?;
        if !response.status().is_success() {
            return Err(format!("{} answered {}", auth.jwks_url, response.status()));
        }
        response
            .body()
            .limit(auth.jwks_max_bytes)
            .await
            .map_err(|e| {
                format!(
                    "{}: {e} (auth.jwks_max_bytes is {})",
                    auth.jwks_url, auth.jwks_max_bytes
                )
            })
    };
    // The client's timeout covers the head; this one covers the body too.
    let body = tokio::time::timeout(auth.jwks_timeout, fetch)
        .await
        .map_err(|_| format!("{}: no answer within auth.jwks_timeout", auth.jwks_url))??;
    jwks.install(&body)
}

/// One fetch, logged and counted.
async fn refresh(verifier: &Verifier, auth: &AuthConfig, stats: &Stats) {
    let Some(jwks) = verifier.jwks() else {
        return;
    };
    match fetch_once(jwks, auth).await {
        Ok(keys) => {
            Stats::add(&stats.jwks_fetches, 1);
            log::debug!("JWKS from {}: {keys} keys", auth.jwks_url);
        }
        Err(e) => {
            Stats::add(&stats.jwks_fetch_failures, 1);
            log::warn!("JWKS not refreshed (the keys held before stay in use): {e}");
        }
    }
}

/// The first fetch, awaited so the hub starts with keys when the provider answers.
pub async fn start(verifier: &Verifier, auth: &AuthConfig, stats: &Stats) {
    refresh(verifier, auth, stats).await;
    if verifier.jwks().is_some_and(Jwks::is_empty) {
        log::warn!(
            "auth.jwks_url: no keys yet; every token is refused until a fetch succeeds (retried every auth.jwks_refresh_interval and on tokens)"
        );
    }
}

/// Runs for the life of the process, on the arbiter it is spawned on.
pub async fn run(verifier: Arc<Verifier>, auth: AuthConfig, stats: Arc<Stats>) {
    let Some(jwks) = verifier.jwks() else {
        return;
    };
    loop {
        tokio::select! {
            _ = tokio::time::sleep(auth.jwks_refresh_interval) => {}
            _ = jwks.wanted() => {}
        }
        refresh(&verifier, &auth, &stats).await;
    }
}
