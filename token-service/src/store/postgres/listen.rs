//! `LISTEN`/`NOTIFY` of lease ends, so every replica wakes its revocation streams at once.

use std::time::Duration;

use futures::StreamExt;
use tokio::sync::watch;
use tokio_postgres::AsyncMessage;

use super::tls::{self, MakeRustls};

/// Channel on which lease ends are announced.
pub(super) const CHANNEL: &str = "jobtoken_lease_ends";

/// Keeps one connection `LISTEN`ing for lease ends, reconnecting after failures; bumps
/// `tx` on every notification (and after each reconnect, in case one was missed).
pub(super) async fn listen(
    config: tokio_postgres::Config,
    tls: MakeRustls,
    tx: watch::Sender<u64>,
) {
    let mut attempt = 0u32;
    while !tx.is_closed() {
        match config.connect(tls.clone()).await {
            Ok((client, mut connection)) => {
                let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
                let listening = async { client.batch_execute(&format!("LISTEN {CHANNEL}")).await };
                // The connection must be driven while LISTEN runs.
                let ok = tokio::select! {
                    r = listening => r.is_ok(),
                    _ = messages.next() => false,
                };
                if ok {
                    attempt = 0;
                    tx.send_modify(|n| *n = n.wrapping_add(1));
                    while let Some(message) = messages.next().await {
                        match message {
                            Ok(AsyncMessage::Notification(_)) => {
                                tx.send_modify(|n| *n = n.wrapping_add(1));
                            }
                            Ok(_) => {}
                            Err(_) => break,
                        }
                        if tx.is_closed() {
                            return;
                        }
                    }
                }
                drop(client);
            }
            Err(e) => {
                tracing::warn!(
                    error = %tls::describe(&e),
                    "cannot reach PostgreSQL to listen for lease ends"
                )
            }
        }
        attempt = attempt.saturating_add(1);
        let wait = Duration::from_millis(200u64.saturating_mul(1 << attempt.min(5)));
        tokio::time::sleep(wait).await;
    }
}
