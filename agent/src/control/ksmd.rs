//! The daemon's hand on ksmd: each tick the observation goes to the controller
//! ([`crate::policy::KsmdController`]), and with `--act ksmd` its decision goes to
//! [`crate::actuate::KsmControl`]. Without `--act` the decision is only published.

use std::collections::BTreeMap;

use crate::{
    actuate::{KsmControl, Restored},
    policy::{KsmdController, KsmdPolicy, Observation, Reason},
    util::thread_cpu,
    wire::KsmdStatus,
};

pub struct Steering {
    controller: KsmdController,
    /// Present when memfabric applies its decisions.
    control: Option<KsmControl>,
    decisions: BTreeMap<Reason, u64>,
    controller_cpu: f64,
    last_error: Option<String>,
    prev: Option<(f64, f64)>,
}

impl Steering {
    pub fn new(policy: KsmdPolicy, control: Option<KsmControl>) -> Steering {
        Steering {
            controller: KsmdController::new(policy),
            control,
            decisions: Reason::ALL.iter().map(|r| (*r, 0)).collect(),
            controller_cpu: 0.0,
            last_error: None,
            prev: None,
        }
    }

    pub fn steering(&self) -> bool {
        self.control.is_some()
    }

    /// Decides (and acts, when steering) on one observation. `observe_cpu` is the CPU the
    /// caller spent building the observation, billed to the controller.
    pub fn tick(&mut self, obs: &Observation, observe_cpu: f64) -> KsmdStatus {
        let cpu0 = thread_cpu();
        let d = self.controller.decide(obs);
        *self.decisions.entry(d.reason).or_default() += 1;
        if let Some(control) = &mut self.control {
            match control.apply(&d.knobs) {
                Ok(()) => {
                    if self.last_error.take().is_some() {
                        tracing::info!("ksmd settings apply again");
                    }
                }
                Err(e) => {
                    let msg = e.to_string();
                    if self.last_error.as_deref() != Some(msg.as_str()) {
                        tracing::warn!("steering ksmd: {msg}");
                    }
                    self.last_error = Some(msg);
                }
            }
        }
        let recent = match self.prev.replace((obs.t, obs.ksmd_cpu_seconds)) {
            Some((t, cpu)) if obs.t > t => ((obs.ksmd_cpu_seconds - cpu) / (obs.t - t)).max(0.0),
            _ => 0.0,
        };
        self.controller_cpu += observe_cpu + (thread_cpu() - cpu0);
        KsmdStatus {
            steering: self.steering(),
            decision: d,
            decisions_total: self.decisions.clone(),
            ksmd_cpu_budget: self.controller.policy().ksmd_cpu,
            ksmd_cpu_recent: recent,
            controller_cpu_seconds: self.controller_cpu,
            last_error: self.last_error.clone(),
        }
    }

    /// Puts ksmd's settings back as they were found (when steering).
    pub fn finish(&mut self) -> Option<Restored> {
        let control = self.control.as_mut()?;
        match control.restore() {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::error!(
                    "restoring KSM settings: {e} (kept in the journal for the next start)"
                );
                None
            }
        }
    }
}
