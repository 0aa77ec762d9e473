//! Prometheus metrics (SPEC §5), served at `http://<metrics>/metrics`.
//!
//! The values live where they are kept (kernel counters, the daemon's state), so each
//! scrape asks the daemon's task for a [`Snapshot`] and encodes it: nothing is counted twice
//! and nothing goes stale.

use std::net::SocketAddr;

use axum::{extract::State, http::header, response::IntoResponse, routing::get, Router};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};
use tokio::sync::{mpsc, oneshot};

/// The numbers of one scrape.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// (verdict: `pass` | `drop` | `audit`, reason, packets).
    pub packets: Vec<(&'static str, &'static str, u64)>,
    /// (state: `active` | `quarantined` | `unknown`, devices).
    pub devices: Vec<(&'static str, u64)>,
    pub generation: u64,
    /// (result: `ok` | `rejected`, reloads).
    pub reloads: Vec<(&'static str, u64)>,
    pub conntrack_entries: u64,
    pub events_suppressed: u64,
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let packets = ConstCounter::new(0u64);
        let mut family = encoder.encode_descriptor(
            "segward_packets",
            "Packets judged, by verdict and reason",
            None,
            packets.metric_type(),
        )?;
        for &(verdict, reason, n) in &self.packets {
            let labels = [("verdict", verdict), ("reason", reason)];
            ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
        }
        let mut family = encoder.encode_descriptor(
            "segward_devices",
            "Devices by state; unknown: sources seen that no device owns",
            None,
            ConstGauge::new(0i64).metric_type(),
        )?;
        for &(state, n) in &self.devices {
            let labels = [("state", state)];
            ConstGauge::new(n as i64).encode(family.encode_family(&labels)?)?;
        }
        let gauge = ConstGauge::new(self.generation as i64);
        gauge.encode(encoder.encode_descriptor(
            "segward_policy_generation",
            "Policy generation in force (1 at start, one more per reload)",
            None,
            gauge.metric_type(),
        )?)?;
        let mut family = encoder.encode_descriptor(
            "segward_policy_reloads",
            "Policy reloads by result",
            None,
            packets.metric_type(),
        )?;
        for &(result, n) in &self.reloads {
            let labels = [("result", result)];
            ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
        }
        let gauge = ConstGauge::new(self.conntrack_entries as i64);
        gauge.encode(encoder.encode_descriptor(
            "segward_conntrack_entries",
            "Entries of the flow table (a reply entry per tracked flow, and an opener entry per answered one)",
            None,
            gauge.metric_type(),
        )?)?;
        let counter = ConstCounter::new(self.events_suppressed);
        counter.encode(encoder.encode_descriptor(
            "segward_events_suppressed",
            "Per-packet events kept from the audit log by the per-device rate limits",
            None,
            counter.metric_type(),
        )?)?;
        Ok(())
    }
}

/// The OpenMetrics text of a snapshot.
pub fn render(snapshot: Snapshot) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(snapshot));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)
        .expect("writing to a String cannot fail");
    text
}

/// A scrape: the daemon's task answers with the text.
pub type Scrape = oneshot::Sender<String>;

/// Serves `/metrics` on `listener`, asking `scrapes` for each answer.
pub async fn serve(listener: tokio::net::TcpListener, scrapes: mpsc::Sender<Scrape>) {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .with_state(scrapes);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::warn!(error = %e, "the metrics server stopped");
    }
}

async fn metrics(State(scrapes): State<mpsc::Sender<Scrape>>) -> impl IntoResponse {
    let (tx, rx) = oneshot::channel();
    let text = match scrapes.send(tx).await {
        Ok(()) => rx.await.unwrap_or_default(),
        Err(_) => String::new(),
    };
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
}

/// Binds the metrics address now, so that a bad one stops the daemon at start.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_renders_every_family_with_its_labels() {
        let text = render(Snapshot {
            packets: vec![("pass", "allowed", 7), ("drop", "default_deny", 3)],
            devices: vec![("active", 4), ("quarantined", 1)],
            generation: 2,
            reloads: vec![("ok", 1), ("rejected", 1)],
            conntrack_entries: 5,
            events_suppressed: 9,
        });
        for line in [
            "segward_packets_total{verdict=\"pass\",reason=\"allowed\"} 7",
            "segward_packets_total{verdict=\"drop\",reason=\"default_deny\"} 3",
            "segward_devices{state=\"quarantined\"} 1",
            "segward_policy_generation 2",
            "segward_policy_reloads_total{result=\"rejected\"} 1",
            "segward_conntrack_entries 5",
            "segward_events_suppressed_total 9",
            "# EOF",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
    }
}
