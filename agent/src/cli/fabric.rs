//! `memfabric peers`, `memfabric candidates`, `memfabric plan`: the fabric as the running
//! daemon sees it (its /v1/peers, /v1/candidates and /v1/plan).

use std::process::ExitCode;

use clap::Args;
use memfabric::config::DEFAULT_LISTEN;
use serde_json::Value;

#[derive(Args)]
pub(super) struct FabricArgs {
    /// Print the daemon's JSON document.
    #[arg(long)]
    json: bool,
    /// Daemon to ask.
    #[arg(long, env = "MEMFABRIC_ENDPOINT", default_value_t = format!("http://{DEFAULT_LISTEN}"))]
    endpoint: String,
}

/// One document from the daemon, or a clear error (exit 1: no daemon; 2: fabric off).
fn fetch(args: &FabricArgs, path: &str) -> Result<Value, (ExitCode, String)> {
    daemon_json(&args.endpoint, path)
}

/// One document from the daemon at `endpoint`, or a clear error (exit 1: no daemon; 2:
/// fabric off).
pub(super) fn daemon_json(endpoint: &str, path: &str) -> Result<Value, (ExitCode, String)> {
    let url = format!("{}{path}", endpoint.trim_end_matches('/'));
    let agent = ureq::Agent::config_builder()
        .timeout_global(Some(std::time::Duration::from_secs(30)))
        .http_status_as_error(false)
        .build()
        .new_agent();
    let mut resp = agent.get(&url).call().map_err(|e| {
        (
            ExitCode::from(1),
            format!("no memfabric daemon at {endpoint}: {e}"),
        )
    })?;
    let status = resp.status();
    let body = resp
        .body_mut()
        .with_config()
        .limit(64 << 20)
        .read_to_string()
        .map_err(|e| (ExitCode::from(1), format!("reading {url}: {e}")))?;
    if status == 404 {
        let msg = serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_owned))
            .unwrap_or(body);
        return Err((ExitCode::from(2), msg));
    }
    if !status.is_success() {
        return Err((ExitCode::from(1), format!("{url}: HTTP {status}: {body}")));
    }
    serde_json::from_str(&body).map_err(|e| (ExitCode::from(1), format!("{url}: {e}")))
}

fn mib(v: &Value) -> String {
    v.as_u64().map_or("-".into(), |b| {
        format!("{:.0} MiB", b as f64 / (1 << 20) as f64)
    })
}

fn show(args: FabricArgs, path: &str, print: fn(&Value)) -> anyhow::Result<ExitCode> {
    match fetch(&args, path) {
        Ok(v) if args.json => {
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(ExitCode::SUCCESS)
        }
        Ok(v) => {
            print(&v);
            Ok(ExitCode::SUCCESS)
        }
        Err((code, msg)) => {
            eprintln!("memfabric: {msg}");
            Ok(code)
        }
    }
}

pub(super) fn peers(args: FabricArgs) -> anyhow::Result<ExitCode> {
    show(args, "/v1/peers", |v| {
        println!(
            "{:<24} {:<22} {:<8} {:>12} {:>12} {:>4}",
            "NODE", "ADDRESS", "STATE", "CAPACITY", "USED", "VMS"
        );
        for p in v["peers"].as_array().into_iter().flatten() {
            println!(
                "{:<24} {:<22} {:<8} {:>12} {:>12} {:>4}{}",
                p["node"].as_str().unwrap_or("?"),
                p["addr"].as_str().unwrap_or("?"),
                p["state"].as_str().unwrap_or("?"),
                mib(&p["capacity_bytes"]),
                mib(&p["used_bytes"]),
                p["vms"].as_u64().map_or("-".into(), |n| n.to_string()),
                p["last_error"]
                    .as_str()
                    .map(|e| format!("  ({e})"))
                    .unwrap_or_default()
            );
        }
    })
}

pub(super) fn candidates(args: FabricArgs) -> anyhow::Result<ExitCode> {
    show(args, "/v1/candidates", |v| {
        println!(
            "{:<38} {:<24} {:>12} {:>8} {:>10}",
            "VM", "HOST", "SHARED", "OF VM", "± (95 %)"
        );
        for c in v["candidates"]["pairs"].as_array().into_iter().flatten() {
            println!(
                "{:<38} {:<24} {:>12} {:>7.1}% {:>10}",
                c["vm"].as_str().unwrap_or("?"),
                c["host"].as_str().unwrap_or("?"),
                mib(&c["shared_bytes"]),
                c["fraction"].as_f64().unwrap_or(0.0) * 100.0,
                c["bound_pages"]
                    .as_u64()
                    .map_or("-".into(), |p| format!("{} pages", p))
            );
        }
    })
}

/// `memfabric plan`: the plan; with `--apply`, this host's moves carried out.
#[derive(Args)]
pub(super) struct PlanArgs {
    #[command(flatten)]
    fabric: FabricArgs,
    /// Carry out the moves of the plan that start on this host, one migration at a time
    /// (as `memfabric migrate --vm VM --to HOST`), stopping at the first that fails.
    /// Without it the plan is only shown (a dry run).
    #[arg(long, requires = "config")]
    apply: bool,
    /// The daemon's config file (its `[fabric]` certificates), for --apply.
    #[arg(long)]
    config: Option<std::path::PathBuf>,
    /// The most each migration may put on the link, in bits per second (`100M`, `2.5G`).
    #[arg(long, value_parser = super::migrate::bits_per_second)]
    bandwidth: Option<u64>,
}

pub(super) fn plan(args: PlanArgs) -> anyhow::Result<ExitCode> {
    let PlanArgs {
        fabric,
        apply,
        config,
        bandwidth,
    } = args;
    let Some(config) = config.filter(|_| apply) else {
        return show_plan(fabric);
    };
    let (plan, me) = match (fetch(&fabric, "/v1/plan"), fetch(&fabric, "/v1/peers")) {
        (Ok(p), Ok(peers)) => (p, peers["node"].as_str().unwrap_or_default().to_owned()),
        (Err((code, msg)), _) | (_, Err((code, msg))) => {
            eprintln!("memfabric: {msg}");
            return Ok(code);
        }
    };
    let moves = moves_from(&plan, &me);
    if moves.is_empty() {
        println!("no move of the plan starts on this host ({me}): nothing to do");
        return Ok(ExitCode::SUCCESS);
    }
    let rt = super::migrate::runtime()?;
    // With --json each migration's summary is one line of JSON on stdout, and what is
    // said about the moves goes to stderr.
    let json = fabric.json;
    let say = |line: String| {
        if json {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    };
    let to_peer = super::migrate::ToPeer {
        config,
        endpoint: fabric.endpoint.clone(),
        bandwidth,
        json,
    };
    for (i, (vm, to)) in moves.iter().enumerate() {
        say(format!(
            "move {} of {}: {vm} from {me} to {to}",
            i + 1,
            moves.len()
        ));
        let code = super::migrate::migrate_one(&to_peer, vm, to, &rt);
        if code != ExitCode::SUCCESS {
            eprintln!(
                "memfabric plan: stopped after {i} of {} moves (the failed one's VM is where \
                 the message above says)",
                moves.len()
            );
            return Ok(code);
        }
    }
    say(match moves.len() {
        1 => "1 move done".to_owned(),
        n => format!("{n} moves done"),
    });
    Ok(ExitCode::SUCCESS)
}

/// The plan's moves that start on host `me`, in the plan's order: (VM, destination).
fn moves_from(plan: &Value, me: &str) -> Vec<(String, String)> {
    plan["moves"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| !me.is_empty() && m["from"] == me)
        .filter_map(|m| Some((m["vm"].as_str()?.to_owned(), m["to"].as_str()?.to_owned())))
        .collect()
}

fn show_plan(args: FabricArgs) -> anyhow::Result<ExitCode> {
    show(args, "/v1/plan", |v| {
        println!(
            "{} hosts, {} VMs: sharing-aware packing uses {} (frees {}); first-fit decreasing uses {} (frees {}); sharing saves {}",
            v["hosts"],
            v["vms"],
            v["hosts_used"],
            v["hosts_freed"],
            v["baseline_hosts_used"],
            v["baseline_hosts_freed"],
            mib(&v["shared_bytes"])
        );
        for m in v["moves"].as_array().into_iter().flatten() {
            println!(
                "  move {} from {} to {}",
                m["vm"].as_str().unwrap_or("?"),
                m["from"].as_str().unwrap_or("?"),
                m["to"].as_str().unwrap_or("?")
            );
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apply_takes_only_this_hosts_moves_in_the_plans_order() {
        let plan = serde_json::json!({ "moves": [
            { "vm": "a", "from": "h1", "to": "h2" },
            { "vm": "b", "from": "h2", "to": "h1" },
            { "vm": "c", "from": "h1", "to": "h3" },
            { "vm": 7, "from": "h1", "to": "h3" },
        ]});
        assert_eq!(
            moves_from(&plan, "h1"),
            vec![("a".into(), "h2".into()), ("c".into(), "h3".into())]
        );
        assert!(moves_from(&plan, "").is_empty(), "no node name: no move");
        assert!(moves_from(&serde_json::json!({}), "h1").is_empty());
    }
}
