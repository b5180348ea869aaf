//! Encoding helpers shared by the collectors: a family with label sets, one gauge, one
//! counter.

use std::fmt;

use prometheus_client::{
    encoding::{
        DescriptorEncoder, EncodeCounterValue, EncodeGaugeValue, EncodeLabelSet, EncodeMetric,
        MetricEncoder,
    },
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
};

/// Encodes one metric family with several label sets (see `labels`).
pub(super) fn family<L: EncodeLabelSet, V: Copy>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    rows: &[(L, V)],
    encode: fn(V, MetricEncoder<'_>) -> fmt::Result,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, kind)?;
    for (labels, v) in rows {
        encode(*v, m.encode_family(labels)?)?;
    }
    Ok(())
}

pub(super) fn enc_gauge<N: EncodeGaugeValue>(v: N, m: MetricEncoder<'_>) -> fmt::Result {
    ConstGauge::new(v).encode(m)
}

pub(super) fn enc_counter(v: u64, m: MetricEncoder<'_>) -> fmt::Result {
    ConstCounter::new(v).encode(m)
}

/// One unlabelled gauge (integer or float).
pub(super) fn gauge<N: EncodeGaugeValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: N,
) -> fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)
}

/// One unlabelled counter (integer or float); `name` without `_total`: prometheus-client
/// adds it to counters.
pub(super) fn counter<N: EncodeCounterValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: N,
) -> fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)
}
