//! Workload profiles of the lab guests, passed to /init on the kernel command line.

use clap::ValueEnum;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Profile {
    /// Identical data in every guest plus some random data, then idle.
    Static,
    /// Like static, plus a region rewritten in place at a steady rate: merged pages are
    /// written again (host COW breaks).
    Churn,
    /// Guests differ: each also holds its own block, and guests alternate kernel versions
    /// when the archive offers more than one: sharing is partial.
    Mixed,
}

impl Profile {
    pub fn name(self) -> &'static str {
        match self {
            Profile::Static => "static",
            Profile::Churn => "churn",
            Profile::Mixed => "mixed",
        }
    }
}

/// Sizes and rates of a guest's workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Workload {
    pub profile: Profile,
    /// MiB identical across guests.
    pub shared_mb: u32,
    /// MiB of random (unique) data.
    pub random_mb: u32,
    /// MiB of this guest's own block (mixed).
    pub own_mb: u32,
    /// MiB rewritten every `churn_secs` (churn).
    pub churn_mb: u32,
    pub churn_secs: u32,
    /// Distinguishes guests' own data.
    pub seed: u32,
    /// Seconds after it is ready, the guest loads `load_mb` MiB identical to the own block
    /// of the guest with seed `load_seed` (0 MiB: never).
    pub load_after_s: u32,
    pub load_mb: u32,
    pub load_seed: u32,
}

impl Workload {
    pub fn new(profile: Profile, seed: u32) -> Workload {
        Workload {
            profile,
            shared_mb: 64,
            random_mb: 16,
            own_mb: if profile == Profile::Mixed { 32 } else { 0 },
            churn_mb: 32,
            churn_secs: 2,
            seed,
            load_after_s: 0,
            load_mb: 0,
            load_seed: 0,
        }
    }

    /// The workload of a guest of `mem_mb` MiB: the sizes above are for the lab's 256 MiB;
    /// a guest n times larger holds n times the shared and random data (its churn stays as
    /// it is), so that a large guest is as full as a small one.
    pub fn scaled_to(mut self, mem_mb: u32) -> Workload {
        let n = (mem_mb / 256).max(1);
        self.shared_mb *= n;
        self.random_mb *= n;
        self
    }

    /// The guest's kernel command line.
    pub fn append(&self) -> String {
        // /init treats mixed like static; the difference is in own_mb and the kernels.
        let profile = match self.profile {
            Profile::Churn => "churn",
            Profile::Static | Profile::Mixed => "static",
        };
        format!(
            "console=ttyS0 quiet panic=-1 memfabric.profile={profile} \
             memfabric.shared_mb={} memfabric.random_mb={} memfabric.own_mb={} \
             memfabric.churn_mb={} memfabric.churn_secs={} memfabric.seed={} \
             memfabric.load_after={} memfabric.load_mb={} memfabric.load_seed={}",
            self.shared_mb,
            self.random_mb,
            self.own_mb,
            self.churn_mb,
            self.churn_secs,
            self.seed,
            self.load_after_s,
            self.load_mb,
            self.load_seed
        )
    }

    /// Guest RAM the workload needs on top of the kernel (MiB).
    pub fn data_mb(&self) -> u32 {
        let churn = if self.profile == Profile::Churn {
            self.churn_mb + 2
        } else {
            0
        };
        self.shared_mb + self.random_mb + self.own_mb + self.load_mb + churn
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_lines_carry_the_profile() {
        let s = Workload::new(Profile::Static, 1).append();
        assert!(
            s.contains("memfabric.profile=static") && s.contains("memfabric.own_mb=0"),
            "{s}"
        );
        let c = Workload::new(Profile::Churn, 2).append();
        assert!(
            c.contains("memfabric.profile=churn") && c.contains("memfabric.churn_mb=32"),
            "{c}"
        );
        let m = Workload::new(Profile::Mixed, 3).append();
        assert!(
            m.contains("memfabric.own_mb=32") && m.contains("memfabric.seed=3"),
            "{m}"
        );
    }

    #[test]
    fn every_parameter_is_parsed_by_init() {
        let init = super::super::initramfs::INIT;
        let line = Workload::new(Profile::Churn, 0).append();
        for arg in line
            .split_whitespace()
            .filter(|a| a.starts_with("memfabric."))
        {
            let key = arg.split('=').next().unwrap();
            assert!(
                init.contains(&format!("{key}=*)")),
                "init.sh does not parse {key}"
            );
        }
    }
}
