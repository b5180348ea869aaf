use proptest::prelude::*;

use super::*;

const R: u64 = 2 << 20;

fn vm(pid: u32, classes: &[RangeClass], sharing: Sharing) -> VmRanges {
    VmRanges {
        pid,
        sharing,
        ram: vec![(0, R * classes.len() as u64)],
        ranges: classes
            .iter()
            .enumerate()
            .map(|(i, c)| (i as u64 * R, (i as u64 + 1) * R, *c))
            .collect(),
    }
}

fn class() -> impl Strategy<Value = RangeClass> {
    prop::sample::select(RangeClass::ALL.to_vec())
}

#[test]
fn a_volatile_range_leaves_after_two_rankings_and_returns_after_three_calm_ones() {
    use RangeClass::*;
    let mut p = HintPlanner::new(HintPolicy {
        readmit_after_seconds: 30.0,
        ..HintPolicy::default()
    });
    assert!(
        p.plan(0.0, &[vm(1, &[Volatile], Sharing::Ranges)])
            .is_empty()
    );
    let d = p.plan(10.0, &[vm(1, &[Volatile], Sharing::Ranges)]);
    assert_eq!(d.len(), 1);
    assert_eq!(
        (d[0].target, d[0].reason),
        (Target::Unmergeable, HintReason::Volatile)
    );
    // Still volatile: nothing more to do.
    assert!(
        p.plan(20.0, &[vm(1, &[Volatile], Sharing::Ranges)])
            .is_empty()
    );
    for t in [30.0, 40.0] {
        assert!(
            p.plan(t, &[vm(1, &[StableDuplicate], Sharing::Ranges)])
                .is_empty()
        );
    }
    let d = p.plan(50.0, &[vm(1, &[StableDuplicate], Sharing::Ranges)]);
    assert_eq!(
        (d[0].target, d[0].reason),
        (Target::Mergeable, HintReason::StableDuplicate)
    );
}

#[test]
fn decisions_that_changed_nothing_do_not_use_up_the_rate() {
    use RangeClass::*;
    let mut p = HintPlanner::new(HintPolicy::default());
    let max = p.policy().max_changes_per_minute;
    // Every other range calm, the rest unknown: each calm one a decision of its own.
    let calm: Vec<RangeClass> = (0..2 * max)
        .map(|i| {
            if i % 2 == 0 {
                StableDuplicate
            } else {
                ColdUnknown
            }
        })
        .collect();
    let mut decided = Vec::new();
    for t in [0.0, 1.0, 2.0] {
        decided = p.plan(t, &[vm(1, &calm, Sharing::Ranges)]);
    }
    assert_eq!(decided.len(), max);
    assert!(decided.iter().all(|d| d.within_rate));
    // All of them found the ranges mergeable already: no change was made.
    for d in &decided {
        p.unchanged(d);
    }
    let mut volatile = calm.clone();
    volatile[1] = Volatile;
    p.plan(3.0, &[vm(1, &volatile, Sharing::Ranges)]);
    let d = p.plan(4.0, &[vm(1, &volatile, Sharing::Ranges)]);
    assert!(
        d.iter()
            .any(|d| d.target == Target::Unmergeable && d.within_rate),
        "{d:?}"
    );
    // Counted as changes, they would have held it back.
    let mut q = HintPlanner::new(HintPolicy::default());
    for t in [0.0, 1.0, 2.0] {
        q.plan(t, &[vm(1, &calm, Sharing::Ranges)]);
    }
    q.plan(3.0, &[vm(1, &volatile, Sharing::Ranges)]);
    let d = q.plan(4.0, &[vm(1, &volatile, Sharing::Ranges)]);
    assert!(d.iter().all(|d| !d.within_rate), "{d:?}");
}

#[test]
fn an_unknown_ranking_between_two_volatile_ones_does_not_reset_the_count() {
    use RangeClass::*;
    let mut p = HintPlanner::new(HintPolicy::default());
    let mut t = 0.0;
    let mut step = |p: &mut HintPlanner, c: RangeClass| {
        t += 1.0;
        p.plan(t, &[vm(1, &[c], Sharing::Ranges)])
    };
    // Churn the scan sees every other pass.
    assert!(step(&mut p, Volatile).is_empty());
    assert!(step(&mut p, ColdUnknown).is_empty());
    let out = step(&mut p, Volatile);
    assert_eq!(out[0].target, Target::Unmergeable, "{out:?}");
    // A calm ranking between does reset it.
    let mut p = HintPlanner::new(HintPolicy::default());
    for c in [Volatile, StableUnique, Volatile, StableDuplicate, Volatile] {
        assert!(step(&mut p, c).is_empty(), "{c:?}");
    }
}

#[test]
fn each_readmission_needs_twice_the_calm() {
    use RangeClass::*;
    let mut p = HintPlanner::new(HintPolicy {
        max_changes_per_minute: 1000,
        readmit_after_seconds: 0.0,
        ..HintPolicy::default()
    });
    let mut t = 0.0;
    let mut step = |p: &mut HintPlanner, c: RangeClass| {
        t += 1.0;
        p.plan(t, &[vm(1, &[c], Sharing::Ranges)])
    };
    // Out, back after 3 calm rankings; out again, back only after 6; then 12.
    for calm_needed in [3, 6, 12] {
        step(&mut p, Volatile);
        let out = step(&mut p, Volatile);
        assert_eq!(out[0].target, Target::Unmergeable);
        for i in 1..calm_needed {
            assert!(
                step(&mut p, StableDuplicate).is_empty(),
                "{calm_needed}: {i}"
            );
        }
        let back = step(&mut p, StableDuplicate);
        assert_eq!(back[0].target, Target::Mergeable, "after {calm_needed}");
    }
}

#[test]
fn a_range_taken_out_stays_out_for_the_hold_doubled_per_readmission() {
    use RangeClass::*;
    let mut p = HintPlanner::new(HintPolicy {
        max_changes_per_minute: 1000,
        ..HintPolicy::default()
    });
    let v = |c| [vm(1, &[c], Sharing::Ranges)];
    let mut t = 0.0;
    for hold in [600.0, 1200.0] {
        p.plan(t + 1.0, &v(Volatile));
        let out = p.plan(t + 2.0, &v(Volatile));
        assert_eq!(out[0].target, Target::Unmergeable);
        let gone = t + 2.0;
        // Calm for long, but not for the hold: it stays out.
        let mut back = None;
        let mut s = gone;
        while back.is_none() {
            s += 10.0;
            let d = p.plan(s, &v(StableDuplicate));
            if !d.is_empty() {
                back = Some((s, d[0].target));
            }
        }
        let (when, target) = back.unwrap();
        assert_eq!(target, Target::Mergeable);
        assert!(
            when - gone >= hold && when - gone < hold + 11.0,
            "{hold}: {}",
            when - gone
        );
        t = when;
    }
}

#[test]
fn neighbours_are_joined_and_a_failure_is_decided_again() {
    use RangeClass::*;
    let mut p = HintPlanner::new(HintPolicy::default());
    let v = vm(
        1,
        &[Volatile, Volatile, StableUnique, Volatile],
        Sharing::Ranges,
    );
    p.plan(0.0, std::slice::from_ref(&v));
    let d = p.plan(1.0, std::slice::from_ref(&v));
    let spans: Vec<(u64, u64)> = d.iter().map(|d| (d.start, d.end)).collect();
    assert_eq!(spans, vec![(0, 2 * R), (3 * R, 4 * R)]);
    p.failed(&d[0]);
    let again = p.plan(2.0, &[v]);
    assert_eq!(again.len(), 1);
    assert_eq!((again[0].start, again[0].end), (0, 2 * R));
}

#[test]
fn a_domain_that_does_not_share_is_made_unmergeable_whole_once() {
    let mut p = HintPlanner::new(HintPolicy::default());
    let v = vm(7, &[RangeClass::StableDuplicate; 4], Sharing::Never);
    let d = p.plan(0.0, std::slice::from_ref(&v));
    assert_eq!(d.len(), 1);
    assert_eq!(
        (d[0].start, d[0].end, d[0].target, d[0].reason),
        (
            0,
            4 * R,
            Target::Unmergeable,
            HintReason::DomainDoesNotShare
        )
    );
    for t in 1..10 {
        assert!(p.plan(t as f64 * 10.0, std::slice::from_ref(&v)).is_empty());
    }
}

proptest! {
    /// Whatever the ranking does, a VM is hinted at most `max_changes_per_minute` times in
    /// any minute.
    #[test]
    fn the_rate_limit_holds(rankings in prop::collection::vec(prop::collection::vec(class(), 1..40), 1..60), step in 1.0f64..20.0) {
        let policy = HintPolicy::default();
        let mut p = HintPlanner::new(policy);
        let mut applied: Vec<f64> = Vec::new();
        for (i, classes) in rankings.iter().enumerate() {
            let t = i as f64 * step;
            for d in p.plan(t, &[vm(1, classes, Sharing::Ranges)]) {
                prop_assert!(d.start < d.end);
                if d.within_rate {
                    applied.push(t);
                }
            }
        }
        for (i, &t) in applied.iter().enumerate() {
            let in_window = applied[i..].iter().take_while(|&&u| u < t + 60.0).count();
            prop_assert!(in_window <= policy.max_changes_per_minute, "{in_window} at {t}");
        }
    }

    /// A range that flips class every ranking never moves (hysteresis), and a VM that
    /// must not share is never made mergeable.
    #[test]
    fn flapping_never_moves_a_range(n in 2usize..30, cls in class()) {
        use RangeClass::*;
        let mut p = HintPlanner::new(HintPolicy::default());
        for i in 0..n {
            let c = if i % 2 == 0 { Volatile } else { StableDuplicate };
            prop_assert!(p.plan(i as f64, &[vm(1, &[c], Sharing::Ranges)]).is_empty());
        }
        for i in 0..n {
            for d in p.plan(100.0 + i as f64, &[vm(2, &[cls, Volatile], Sharing::Never)]) {
                prop_assert_eq!(d.target, Target::Unmergeable);
            }
        }
    }

    /// A constant ranking gives at most one decision per range, ever.
    #[test]
    fn a_constant_ranking_settles(classes in prop::collection::vec(class(), 1..20)) {
        let mut p = HintPlanner::new(HintPolicy { max_changes_per_minute: 1000, ..HintPolicy::default() });
        let mut covered = 0u64;
        for i in 0..10 {
            for d in p.plan(i as f64, &[vm(1, &classes, Sharing::Ranges)]) {
                covered += (d.end - d.start) / R;
            }
        }
        prop_assert!(covered <= classes.len() as u64);
    }
}
