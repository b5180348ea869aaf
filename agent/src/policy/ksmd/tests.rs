use proptest::prelude::*;

use super::*;

/// A host with 200 Ki pages of mergeable guest RAM, KSM counters at rest.
fn base() -> Observation {
    Observation {
        t: 0.0,
        mergeable_pages: 200_000,
        mem_available_bytes: 16 << 30,
        mem_total_bytes: 24 << 30,
        ..Observation::default()
    }
}

/// Advances `o` by `dt` seconds of ksmd scanning at `knobs`, each page costing `cost` s,
/// with a full scan every `scan` pages; `merged` pages merged per full scan.
fn advance(
    o: &Observation,
    knobs: Knobs,
    dt: f64,
    cost: f64,
    scan: u64,
    merged: u64,
) -> Observation {
    let mut n = o.clone();
    n.t += dt;
    let pages = crate::util::convert::u64_of_f64(knobs.pace() * dt);
    n.ksm.pages_scanned += pages;
    n.ksmd_cpu_seconds += pages as f64 * cost;
    let scans = n.ksm.pages_scanned / scan;
    n.ksm.pages_sharing += (scans - o.ksm.full_scans) * merged;
    n.ksm.full_scans = scans;
    n
}

/// Runs the controller on a simulated ksmd until `t_end`; returns the decisions.
fn simulate(c: &mut KsmdController, mut o: Observation, t_end: f64, merged: u64) -> Vec<Decision> {
    let mut out = vec![c.decide(&o)];
    while o.t < t_end {
        o = advance(&o, out.last().unwrap().knobs, 2.0, 2e-6, 200_000, merged);
        out.push(c.decide(&o));
    }
    out
}

/// Runs the controller from `o` (ksmd at `d`'s knobs) until `t_end`, on a simulated ksmd
/// whose full scans are `scan` pages and merge nothing; returns the last observation and
/// decision.
fn run_until(
    c: &mut KsmdController,
    mut o: Observation,
    mut d: Decision,
    t_end: f64,
    scan: u64,
) -> (Observation, Decision) {
    while o.t < t_end {
        o = advance(&o, d.knobs, 2.0, 2e-6, scan, 0);
        d = c.decide(&o);
    }
    (o, d)
}

#[test]
fn starts_hot_then_goes_quiet_when_scans_merge_nothing() {
    let mut c = KsmdController::new(KsmdPolicy::default());
    let d = simulate(&mut c, base(), 400.0, 0);
    assert_eq!(d[0].reason, Reason::Starting);
    // 200 Ki pages in 8 s: 25 Ki pages/s, well above stock's 5,000.
    assert!(d[0].knobs.pace() >= 25_000.0 * 0.95, "{:?}", d[0]);
    let last = d.last().unwrap();
    assert_eq!(last.reason, Reason::Quiet, "{last:?}");
    // The first quiet full scan in 120 s (1,667 pages/s, of a scan size measured within a
    // tick's pages), then slower.
    let first_quiet = d.iter().find(|d| d.reason == Reason::Quiet).unwrap();
    assert!(
        (1_300.0..=2_000.0).contains(&first_quiet.knobs.pace()),
        "{first_quiet:?}"
    );
    assert!(last.knobs.pace() < first_quiet.knobs.pace(), "{last:?}");
    assert!(!last.capped);
}

#[test]
fn a_quiet_host_backs_off_to_the_longest_period_and_a_trigger_starts_again() {
    let mut c = KsmdController::new(KsmdPolicy::default());
    let d = c.decide(&base());
    let (mut o, d) = run_until(&mut c, base(), d, 3_000.0, 200_000);
    // A full scan every 600 s: 333 pages/s, quantized up by at most a quarter octave and
    // kept within a third of one (the knobs' 10 ms sleep steps).
    assert_eq!(d.reason, Reason::Quiet);
    assert!((333.0..=520.0).contains(&d.knobs.pace()), "{d:?}");
    // A VM arrives: hot, then quiet again at the 120 s period.
    o.vms_arrived += 1;
    let (_, d) = run_until(&mut c, o, d, 3_100.0, 200_000);
    assert_eq!(d.reason, Reason::Quiet);
    assert!((1_300.0..=2_100.0).contains(&d.knobs.pace()), "{d:?}");
}

#[test]
fn the_quiet_scan_covers_what_ksmd_scans_not_all_guest_ram() {
    let mut c = KsmdController::new(KsmdPolicy::default());
    let d = c.decide(&base());
    // The hints left a quarter of the 200 Ki pages mergeable: ksmd's full scans are
    // 50 Ki pages.
    let (_, d) = run_until(&mut c, base(), d, 200.0, 50_000);
    assert_eq!(d.reason, Reason::Quiet);
    assert!(d.knobs.pace() <= 50_000.0 / 120.0 * 1.2, "{d:?}");
}

#[test]
fn a_full_scan_that_merged_earns_another() {
    let mut c = KsmdController::new(KsmdPolicy::default());
    // 5,000 pages merged per full scan: the controller never settles.
    let d = simulate(&mut c, base(), 300.0, 5_000);
    assert!(
        d.iter().skip(10).all(|d| d.reason == Reason::Merging),
        "{:?}",
        d.last()
    );
    assert!(d.last().unwrap().knobs.pace() >= 20_000.0);
}

/// One full scan at the controller's pace that merges `merged` pages; returns the last
/// decision.
fn one_full_scan(c: &mut KsmdController, o: &mut Observation, merged: u64) -> Decision {
    let target = o.ksm.full_scans + 1;
    let mut d = *c.last().unwrap();
    while o.ksm.full_scans < target {
        let before = o.ksm.full_scans;
        *o = advance(o, d.knobs, 2.0, 2e-6, 200_000, 0);
        if o.ksm.full_scans > before {
            o.ksm.pages_sharing += merged;
        }
        d = c.decide(o);
    }
    d
}

#[test]
fn converging_merges_stop_the_hot_scans_a_steady_gain_keeps_them() {
    // The start's three hot scans, then merges that fall off as on the timeline bench:
    // no fourth hot scan after a scan that merged under a quarter of its predecessor.
    let mut c = KsmdController::new(KsmdPolicy::default());
    let mut o = base();
    c.decide(&o);
    for merged in [8_541, 78_161] {
        assert_ne!(one_full_scan(&mut c, &mut o, merged).reason, Reason::Quiet);
    }
    assert_eq!(one_full_scan(&mut c, &mut o, 3_051).reason, Reason::Quiet);
    // Gains that stay up (a second VM merging in waves) keep it hot.
    let mut c = KsmdController::new(KsmdPolicy::default());
    let mut o = base();
    c.decide(&o);
    for merged in [8_541, 78_161, 40_000, 30_000, 20_000] {
        one_full_scan(&mut c, &mut o, merged);
    }
    assert_eq!(c.last().unwrap().reason, Reason::Merging);
    assert!(merging_pays(2_000, Some(2_000), 256));
    assert!(!merging_pays(15_936, Some(72_140), 256));
    assert!(!merging_pays(2_366, Some(23_467), 256));
    assert!(!merging_pays(200, None, 256));
}

fn settled() -> (KsmdController, Observation) {
    let mut c = KsmdController::new(KsmdPolicy::default());
    let d = c.decide(&base());
    let (o, _) = run_until(&mut c, base(), d, 200.0, 200_000);
    assert_eq!(c.last().unwrap().reason, Reason::Quiet);
    (c, o)
}

#[test]
fn each_change_has_its_reason() {
    type Change = fn(&mut Observation);
    let cases: [(Change, Reason); 5] = [
        (|o| o.ksm_enters += 1, Reason::NewMemory),
        (|o| o.vms_arrived += 1, Reason::NewMemory),
        (|o| o.guest_writes += 4096, Reason::GuestsWriting),
        (
            |o| o.potential_savings_pages = Some(10_000),
            Reason::Unmerged,
        ),
        (|o| o.mem_available_bytes = 1 << 30, Reason::MemoryPressure),
    ];
    for (change, reason) in cases {
        let (mut c, mut o) = settled();
        o.t += 2.0;
        change(&mut o);
        let d = c.decide(&o);
        assert_eq!(d.reason, reason);
        assert!(d.knobs.pace() >= 5_000.0, "{reason:?}: {d:?}");
    }
    // Small guest writes and unchanged scanner figures are no change.
    let (mut c, mut o) = settled();
    o.t += 2.0;
    o.guest_writes += 100;
    assert_eq!(c.decide(&o).reason, Reason::Quiet);
}

#[test]
fn the_budget_caps_an_expensive_ksmd() {
    let mut c = KsmdController::new(KsmdPolicy {
        ksmd_cpu: 0.02,
        ..KsmdPolicy::default()
    });
    let mut o = base();
    let mut d = c.decide(&o);
    for _ in 0..20 {
        // 20 us per page: 10x the prior.
        o = advance(&o, d.knobs, 2.0, 20e-6, 200_000, 0);
        d = c.decide(&o);
    }
    assert!(d.capped, "{d:?}");
    // 2 % of a core at 20 us per page: 1,000 pages/s.
    assert!(d.knobs.pace() <= 1_000.0 * 1.05, "{d:?}");
    assert!((d.cost_us_per_page - 20.0).abs() < 1.0, "{d:?}");
}

#[test]
fn knobs_for_a_pace() {
    assert_eq!(
        knobs_for(5_000.0, 1e9),
        Knobs {
            run: true,
            pages_to_scan: 100,
            sleep_millisecs: 20
        }
    );
    let slow = knobs_for(500.0, 1e9);
    assert_eq!((slow.pages_to_scan, slow.sleep_millisecs), (100, 200));
    assert_eq!(knobs_for(0.01, 1e9).sleep_millisecs, 1000);
    assert!(knobs_for(40_000.0, 30_000.0).pace() <= 30_000.0);
}

/// `d`'s pace is at least `floor`, to the knobs' granularity (one page per wake-up).
fn at_least(d: &Decision, floor: f64) -> bool {
    let grain = 1.0 / d.knobs.pages_to_scan.max(1) as f64;
    d.knobs.pace() >= floor * (1.0 - grain) * 0.999
}

/// One tick of a random host: how far each counter moves.
#[derive(Clone, Debug)]
struct Step {
    dt: f64,
    cost: f64,
    full_scans: u64,
    merged: u64,
    enters: u64,
    writes: u64,
    savings: Option<u64>,
    available_gib: u64,
}

fn step() -> impl Strategy<Value = Step> {
    (
        0.2f64..10.0,
        1e-7f64..1e-4,
        prop_oneof![8 => Just(0u64), 2 => 1u64..3],
        prop_oneof![6 => Just(0u64), 4 => 0u64..20_000],
        prop_oneof![9 => Just(0u64), 1 => Just(1u64)],
        prop_oneof![7 => Just(0u64), 3 => 0u64..10_000],
        proptest::option::of(0u64..100_000),
        0u64..24,
    )
        .prop_map(
            |(dt, cost, full_scans, merged, enters, writes, savings, available_gib)| Step {
                dt,
                cost,
                full_scans,
                merged,
                enters,
                writes,
                savings,
                available_gib,
            },
        )
}

fn apply(o: &Observation, knobs: Knobs, s: &Step) -> Observation {
    let mut n = o.clone();
    n.t += s.dt;
    let pages = crate::util::convert::u64_of_f64(knobs.pace() * s.dt);
    n.ksm.pages_scanned += pages;
    n.ksmd_cpu_seconds += pages as f64 * s.cost;
    n.ksm.full_scans += s.full_scans;
    n.ksm.pages_sharing += s.merged;
    n.ksm_enters += s.enters;
    n.guest_writes += s.writes;
    n.potential_savings_pages = s.savings;
    n.mem_available_bytes = s.available_gib << 30;
    n
}

/// Decides on `o`, then on each of `steps` applied in turn; `each` sees every decision.
/// Returns the last observation and decision.
fn play(
    c: &mut KsmdController,
    mut o: Observation,
    steps: &[Step],
    mut each: impl FnMut(&Decision, &Observation, &KsmdController) -> Result<(), TestCaseError>,
) -> Result<(Observation, Decision), TestCaseError> {
    let mut d = c.decide(&o);
    each(&d, &o, c)?;
    for s in steps {
        o = apply(&o, d.knobs, s);
        d = c.decide(&o);
        each(&d, &o, c)?;
    }
    Ok((o, d))
}

/// For [`play`] when only the end matters.
fn nothing(_: &Decision, _: &Observation, _: &KsmdController) -> Result<(), TestCaseError> {
    Ok(())
}

fn policy() -> impl Strategy<Value = KsmdPolicy> {
    (0.001f64..1.0, 2.0f64..60.0, 60.0f64..1000.0).prop_map(|(cpu, hot, idle)| KsmdPolicy {
        ksmd_cpu: cpu,
        hot_scan_seconds: hot,
        idle_scan_seconds: idle,
        ..KsmdPolicy::default()
    })
}

proptest! {
    /// Whatever happens, ksmd is never asked for more than its budget at the measured cost.
    #[test]
    fn the_budget_holds(policy in policy(), steps in prop::collection::vec(step(), 1..60)) {
        let mut c = KsmdController::new(policy);
        play(&mut c, base(), &steps, |d, _, c| {
            let pace = d.knobs.pace();
            prop_assert!(pace <= d.budget_pages_per_sec.max(1.0) * 1.0001,
                "pace {pace} over budget {}", d.budget_pages_per_sec);
            prop_assert!(pace * c.cost_per_page() <= policy.ksmd_cpu.max(c.cost_per_page()) * 1.0001);
            Ok(())
        })?;
    }

    /// From a new mm on, the pace does not drop under the hot floor until KSM has made the
    /// full scans it needs (or the trigger expired).
    #[test]
    fn a_new_mm_is_never_starved(
        policy in policy(),
        before in prop::collection::vec(step(), 0..30),
        after in prop::collection::vec(step(), 1..30),
    ) {
        let mut c = KsmdController::new(policy);
        let (mut o, _) = play(&mut c, base(), &before, nothing)?;
        o.t += 1.0;
        o.ksm_enters += 1;
        let (t0, scans0) = (o.t, o.ksm.full_scans);
        play(&mut c, o, &after, |d, o, c| {
            if o.ksm.full_scans < scans0 + policy.hot_scans && o.t < t0 + policy.hot_max_seconds {
                prop_assert!(at_least(d, c.hot_floor()),
                    "pace {} under floor {} at t={}", d.knobs.pace(), c.hot_floor(), o.t - t0);
                prop_assert_ne!(d.reason, Reason::Quiet);
            }
            Ok(())
        })?;
    }

    /// Savings the scanner reports (more than before) get the same floor.
    #[test]
    fn reported_savings_are_never_starved(policy in policy(), savings in 2048u64..1_000_000) {
        let mut c = KsmdController::new(policy);
        let mut o = base();
        let mut d = c.decide(&o);
        for _ in 0..200 {
            o = advance(&o, d.knobs, 2.0, 2e-6, 200_000, 0);
            d = c.decide(&o);
        }
        o.t += 2.0;
        o.potential_savings_pages = Some(savings);
        let d = c.decide(&o);
        prop_assert_eq!(d.reason, Reason::Unmerged);
        prop_assert!(at_least(&d, c.hot_floor()), "{d:?} floor {}", c.hot_floor());
    }

    /// The same observation, over and over: one setting, never a flip.
    #[test]
    fn constant_input_gives_constant_output(policy in policy(), steps in prop::collection::vec(step(), 0..20)) {
        let mut c = KsmdController::new(policy);
        let (o, _) = play(&mut c, base(), &steps, nothing)?;
        let first = c.decide(&o);
        for _ in 0..50 {
            prop_assert_eq!(c.decide(&o).knobs, first.knobs);
        }
    }

    /// A steady host (ksmd scanning at the asked pace, nothing merging, a constant cost):
    /// once quiet, the knobs are written at most once more, and once per doubling of the
    /// quiet period.
    #[test]
    fn a_steady_host_sees_no_oscillation(policy in policy(), cost in 1e-7f64..5e-5) {
        let mut c = KsmdController::new(policy);
        let mut o = base();
        let mut d = c.decide(&o);
        let mut changes = 0;
        let mut quiet = false;
        for _ in 0..600 {
            o = advance(&o, d.knobs, 2.0, cost, 200_000, 0);
            let n = c.decide(&o);
            if quiet && n.knobs != d.knobs {
                changes += 1;
            }
            quiet |= n.reason == Reason::Quiet;
            d = n;
        }
        prop_assert!(quiet);
        let doublings = (policy.idle_max_scan_seconds / policy.idle_scan_seconds).log2().ceil().max(0.0);
        prop_assert!(f64::from(changes) <= 1.0 + doublings, "{changes} knob changes on a steady host");
    }
}

#[test]
fn hot_scans_wait_for_the_hints_then_start_afresh() {
    let mut c = KsmdController::new(KsmdPolicy::default());
    let mut o = Observation {
        hints_settling: true,
        ..base()
    };
    let mut d = vec![c.decide(&o)];
    // Held for 150 s: longer than a trigger stays hot on its own.
    while o.t < 150.0 {
        o = advance(&o, d.last().unwrap().knobs, 2.0, 2e-6, 200_000, 0);
        d.push(c.decide(&o));
    }
    for x in &d {
        assert_eq!(x.reason, Reason::HintsSettling, "{x:?}");
        assert!(x.knobs.pace() <= 2_000.0, "held at the quiet pace: {x:?}");
    }
    // The hints have judged every VM: the start's heat begins now, in full.
    o.hints_settling = false;
    o = advance(&o, d.last().unwrap().knobs, 2.0, 2e-6, 200_000, 0);
    let released = c.decide(&o);
    assert_eq!(released.reason, Reason::Starting, "{released:?}");
    assert!(released.knobs.pace() >= 25_000.0 * 0.95, "{released:?}");

    // Memory pressure is never held.
    let mut c = KsmdController::new(KsmdPolicy::default());
    let o = Observation {
        hints_settling: true,
        mem_available_bytes: 1 << 30,
        ..base()
    };
    c.decide(&o);
    let d = c.decide(&advance(&o, c.last().unwrap().knobs, 2.0, 2e-6, 200_000, 0));
    assert_ne!(d.reason, Reason::HintsSettling, "{d:?}");
    assert!(d.knobs.pace() >= 5_000.0, "{d:?}");
}
