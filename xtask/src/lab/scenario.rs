//! Scenarios: a small TOML file of timed events that drives a living host (guests that
//! arrive, load data that duplicates another guest's, churn at different rates, leave).
//! KSM policies that look fine on a static start can fail here.

use std::{
    fs,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::Deserialize;

use super::{Guest, Images, Profile, Workload, qemu};

/// The built-in scenario, `timeline`.
pub const TIMELINE: &str = include_str!("timeline.toml");

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    pub duration_s: u64,
    #[serde(default = "default_mem")]
    pub mem_mb: u32,
    #[serde(rename = "guest")]
    pub guests: Vec<GuestPlan>,
}

fn default_mem() -> u32 {
    256
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestPlan {
    pub name: String,
    pub seed: u32,
    #[serde(default)]
    pub start_s: u64,
    pub stop_s: Option<u64>,
    #[serde(default = "static_profile")]
    pub profile: ProfileName,
    pub shared_mb: Option<u32>,
    pub random_mb: Option<u32>,
    #[serde(default)]
    pub own_mb: u32,
    pub churn_mb: Option<u32>,
    pub churn_secs: Option<u32>,
    pub load_at_s: Option<u64>,
    #[serde(default)]
    pub load_mb: u32,
    #[serde(default)]
    pub load_seed: u32,
    /// Kernel version for this guest (default: the lab's default).
    pub kernel: Option<String>,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ProfileName {
    Static,
    Churn,
}

fn static_profile() -> ProfileName {
    ProfileName::Static
}

impl GuestPlan {
    pub fn workload(&self) -> Workload {
        let profile = match self.profile {
            ProfileName::Static => Profile::Static,
            ProfileName::Churn => Profile::Churn,
        };
        let mut w = Workload::new(profile, self.seed);
        w.own_mb = self.own_mb;
        if let Some(v) = self.shared_mb {
            w.shared_mb = v;
        }
        if let Some(v) = self.random_mb {
            w.random_mb = v;
        }
        if let Some(v) = self.churn_mb {
            w.churn_mb = v;
        }
        if let Some(v) = self.churn_secs {
            w.churn_secs = v.max(1);
        }
        if let Some(at) = self.load_at_s {
            w.load_after_s = at.saturating_sub(self.start_s) as u32;
            w.load_mb = self.load_mb;
            w.load_seed = self.load_seed;
        }
        w
    }
}

impl Scenario {
    /// `timeline` (built in) or a path to a TOML file.
    pub fn load(spec: &str) -> anyhow::Result<Scenario> {
        let (text, origin) = if spec == "timeline" {
            (TIMELINE.to_owned(), "built-in timeline".to_owned())
        } else {
            (
                fs::read_to_string(spec).with_context(|| format!("reading scenario {spec}"))?,
                spec.to_owned(),
            )
        };
        let s: Scenario = toml::from_str(&text).with_context(|| format!("scenario {origin}"))?;
        s.validate().with_context(|| format!("scenario {origin}"))?;
        Ok(s)
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.guests.is_empty() {
            bail!("no [[guest]]");
        }
        if !self.guests.iter().any(|g| g.start_s == 0) {
            bail!("at least one guest must start at t=0");
        }
        for (i, g) in self.guests.iter().enumerate() {
            if self.guests[..i].iter().any(|o| o.name == g.name) {
                bail!("guest name {} used twice", g.name);
            }
            if g.start_s >= self.duration_s {
                bail!(
                    "{} starts at {} s, after the scenario ends ({} s)",
                    g.name,
                    g.start_s,
                    self.duration_s
                );
            }
            if let Some(stop) = g.stop_s
                && stop <= g.start_s
            {
                bail!("{} stops at {stop} s, before it starts", g.name);
            }
            if g.load_at_s.is_some() && g.load_mb == 0 {
                bail!("{} has load_at_s but no load_mb", g.name);
            }
            let need = g.workload().data_mb() + 96;
            if self.mem_mb < need {
                bail!(
                    "{} needs {need} MiB of guest RAM, mem_mb is {}",
                    g.name,
                    self.mem_mb
                );
            }
        }
        Ok(())
    }

    /// Times at which something happens (start at 0 included), sorted: phase boundaries.
    pub fn event_times(&self) -> Vec<(u64, String)> {
        let mut v = vec![(0, "start".to_owned())];
        for g in &self.guests {
            if g.start_s > 0 {
                v.push((g.start_s, format!("{} starts", g.name)));
            }
            if let Some(t) = g.stop_s {
                v.push((t, format!("{} stops", g.name)));
            }
            if let Some(t) = g.load_at_s {
                v.push((
                    t,
                    format!(
                        "{} loads {} MiB like seed {}",
                        g.name, g.load_mb, g.load_seed
                    ),
                ));
            }
        }
        v.sort();
        v
    }

    /// Plays the scenario: boots the t=0 guests and waits until they are ready, calls
    /// `on_start`, then every second calls `on_tick(t)` while starting and stopping guests
    /// on time, for `duration_s`. Leaves the guests still planned to run up.
    pub fn play(
        &self,
        images: &Images,
        mut on_start: impl FnMut() -> anyhow::Result<()>,
        mut on_tick: impl FnMut(u64) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let kernel_of = |g: &GuestPlan| -> usize {
            g.kernel
                .as_ref()
                .and_then(|k| {
                    let pkg = super::kernel::package_name(k);
                    images.kernels.iter().position(|x| x.package == pkg)
                })
                .unwrap_or(0)
        };
        // Scenario guests keep QEMU's default mem-merge=on.
        let boot = |g: &GuestPlan| {
            super::start(
                images,
                &g.name,
                g.workload(),
                self.mem_mb,
                kernel_of(g),
                true,
            )
        };
        let mut running: Vec<(usize, Guest)> = Vec::new();
        for (i, g) in self
            .guests
            .iter()
            .enumerate()
            .filter(|(_, g)| g.start_s == 0)
        {
            running.push((i, boot(g)?));
        }
        let first: Vec<Guest> = running.iter().map(|(_, g)| g.clone()).collect();
        qemu::wait_ready(&first, Duration::from_secs(300))?;
        on_start()?;
        let t0 = Instant::now();
        let mut waiting_ready: Vec<Guest> = Vec::new();
        for t in 1..=self.duration_s {
            std::thread::sleep(
                (t0 + Duration::from_secs(t)).saturating_duration_since(Instant::now()),
            );
            for (i, g) in self.guests.iter().enumerate() {
                if g.start_s == t {
                    let guest = boot(g)?;
                    eprintln!("scenario: t={t}s {} starts", g.name);
                    waiting_ready.push(guest.clone());
                    running.push((i, guest));
                }
                if g.stop_s == Some(t)
                    && let Some(pos) = running.iter().position(|(j, _)| *j == i)
                {
                    let (_, guest) = running.remove(pos);
                    super::stop(&guest)?;
                    eprintln!("scenario: t={t}s {} stopped", g.name);
                }
            }
            waiting_ready.retain(|g| {
                let ready = fs::read_to_string(&g.console).is_ok_and(|c| c.contains(qemu::READY));
                if ready {
                    eprintln!("scenario: t={t}s {} ready", g.name);
                }
                !ready && qemu::alive(g)
            });
            on_tick(t)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builtin_timeline_is_valid_and_has_its_events() {
        let s = Scenario::load("timeline").unwrap();
        assert_eq!(s.guests.len(), 4);
        let events: Vec<u64> = s.event_times().iter().map(|(t, _)| *t).collect();
        assert_eq!(events, vec![0, 120, 240, 360]);
        let lab3 = s
            .guests
            .iter()
            .find(|g| g.name == "lab-3")
            .unwrap()
            .workload();
        assert_eq!(
            (lab3.load_after_s, lab3.load_mb, lab3.load_seed),
            (240, 32, 2)
        );
        assert!(lab3.append().contains("memfabric.load_after=240"));
    }

    #[test]
    fn bad_scenarios_are_refused_with_the_reason() {
        let bad = |text: &str| -> String {
            let s: Scenario = match toml::from_str(text) {
                Ok(s) => s,
                Err(e) => return e.to_string(),
            };
            s.validate().unwrap_err().to_string()
        };
        let base = "name='x'\nduration_s=60\n";
        assert!(bad(&format!("{base}[[guest]]\nname='a'\nseed=1\nstart_s=5\n")).contains("t=0"));
        assert!(
            bad(&format!(
                "{base}[[guest]]\nname='a'\nseed=1\n[[guest]]\nname='a'\nseed=2\n"
            ))
            .contains("used twice")
        );
        assert!(
            bad(&format!("{base}[[guest]]\nname='a'\nseed=1\nstop_s=0\n"))
                .contains("before it starts")
        );
        assert!(bad(&format!("{base}[[guest]]\nname='a'\nseed=1\nbogus=1\n")).contains("bogus"));
        assert!(bad(&format!("{base}mem_mb=100\n[[guest]]\nname='a'\nseed=1\n")).contains("needs"));
    }
}
