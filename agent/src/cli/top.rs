//! `memfabric top`: `status`, refreshing in place (ratatui), sortable by savings or churn.

use std::{
    process::ExitCode,
    time::{Duration, Instant},
};

use clap::Args;
use memfabric::{config::DEFAULT_LISTEN, model::VmState};
use ratatui::{
    crossterm::event::{self, Event, KeyCode, KeyEventKind},
    layout::{Constraint, Layout},
    style::{Modifier, Style},
    text::Line,
    widgets::{Block, Paragraph, Row, Table},
};

#[derive(Args)]
pub(super) struct TopArgs {
    /// Daemon to ask.
    #[arg(long, env = "MEMFABRIC_ENDPOINT", default_value_t = format!("http://{DEFAULT_LISTEN}"))]
    endpoint: String,
    /// Refresh interval in milliseconds.
    #[arg(long, default_value_t = 2000)]
    interval_ms: u64,
}

/// Row order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum SortBy {
    /// Most merged memory first.
    Savings,
    /// Most COW breaks per second first, then write faults.
    Churn,
    Name,
}

impl SortBy {
    fn label(self) -> &'static str {
        match self {
            SortBy::Savings => "savings",
            SortBy::Churn => "churn",
            SortBy::Name => "name",
        }
    }
}

pub(super) fn sort(vms: &mut [VmState], by: SortBy) {
    match by {
        SortBy::Savings => vms.sort_by_key(|v| std::cmp::Reverse(v.ksm.merging_pages)),
        SortBy::Churn => vms.sort_by(|a, b| {
            b.cow_breaks_per_sec
                .total_cmp(&a.cow_breaks_per_sec)
                .then(b.write_faults_per_sec.total_cmp(&a.write_faults_per_sec))
        }),
        SortBy::Name => vms.sort_by(|a, b| a.vm.name.cmp(&b.vm.name)),
    }
}

pub(super) fn run(args: TopArgs) -> anyhow::Result<ExitCode> {
    let mut terminal = ratatui::try_init()?;
    let result = (|| -> anyhow::Result<()> {
        let interval = Duration::from_millis(args.interval_ms.max(200));
        let mut by = SortBy::Savings;
        let mut last = Instant::now() - interval;
        let (mut state, mut source) = super::status::load(&args.endpoint);
        loop {
            if last.elapsed() >= interval {
                (state, source) = super::status::load(&args.endpoint);
                last = Instant::now();
            }
            let mut vms = state.vms.clone();
            sort(&mut vms, by);
            let k = &state.ksm;
            terminal.draw(|f| {
                let [head, body, foot] = Layout::vertical([
                    Constraint::Length(5),
                    Constraint::Min(3),
                    Constraint::Length(1),
                ])
                .areas(f.area());
                f.render_widget(
                    Paragraph::new(vec![
                        Line::from(super::status::ksm_line(k)),
                        Line::from(super::status::ksmd_line(&state).unwrap_or_default()),
                        Line::from(format!("source: {source}")),
                    ])
                    .block(Block::bordered().title(" memfabric top ")),
                    head,
                );
                let header = Row::new(super::status::COLUMNS)
                    .style(Style::new().add_modifier(Modifier::BOLD));
                let rows = vms.iter().map(|v| Row::new(super::status::row(v)));
                let widths = [
                    Constraint::Length(18),
                    Constraint::Length(8),
                    Constraint::Length(12),
                    Constraint::Length(8),
                    Constraint::Length(11),
                    Constraint::Length(11),
                    Constraint::Length(9),
                    Constraint::Length(9),
                    Constraint::Length(10),
                ];
                f.render_widget(
                    Table::new(rows, widths).header(header).block(
                        Block::bordered().title(format!(
                            " {} VMs, sorted by {} ",
                            vms.len(),
                            by.label()
                        )),
                    ),
                    body,
                );
                f.render_widget(
                    Paragraph::new("q quit · s sort by savings · c by churn · n by name"),
                    foot,
                );
            })?;
            if event::poll(Duration::from_millis(200))?
                && let Event::Key(key) = event::read()?
                && key.kind == KeyEventKind::Press
            {
                match key.code {
                    KeyCode::Char('q') | KeyCode::Esc => return Ok(()),
                    KeyCode::Char('s') => by = SortBy::Savings,
                    KeyCode::Char('c') => by = SortBy::Churn,
                    KeyCode::Char('n') => by = SortBy::Name,
                    _ => {}
                }
            }
        }
    })();
    ratatui::restore();
    result?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use memfabric::host::inventory::{Mergeability, Vm, VmKind};

    use super::*;

    fn vm(name: &str, merged: i64, cow: f64) -> VmState {
        VmState {
            vm: Vm {
                pid: 1,
                kind: VmKind::Qemu,
                name: name.into(),
                uuid: None,
                guest_memory_bytes: 0,
                ram: vec![],
                mergeability: Mergeability::Unknown,
                merge_off: false,
            },
            ksm: memfabric::host::ksm::KsmStat {
                merging_pages: merged,
                ..Default::default()
            },
            probes: None,
            scan: None,
            range_classes: None,
            scan_pass_seconds: None,
            write_faults_per_sec: 0.0,
            cow_breaks_per_sec: cow,
        }
    }

    #[test]
    fn sorts_by_savings_churn_and_name() {
        let mut v = vec![vm("b", 10, 5.0), vm("a", 30, 1.0), vm("c", 20, 9.0)];
        let names = |v: &[VmState]| v.iter().map(|x| x.vm.name.clone()).collect::<Vec<_>>();
        sort(&mut v, SortBy::Savings);
        assert_eq!(names(&v), ["a", "c", "b"]);
        sort(&mut v, SortBy::Churn);
        assert_eq!(names(&v), ["c", "b", "a"]);
        sort(&mut v, SortBy::Name);
        assert_eq!(names(&v), ["a", "b", "c"]);
    }

    #[test]
    fn rates_show_a_dash_without_probes() {
        assert_eq!(super::super::status::row(&vm("x", 256, 0.0))[4], "1.0");
        assert_eq!(super::super::status::row(&vm("x", 0, 0.0))[7], "-");
        assert_eq!(super::super::status::row(&vm("x", 0, 0.0))[8], "-");
    }
}
