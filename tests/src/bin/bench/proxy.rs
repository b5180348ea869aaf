//! `bench proxy`: how fast the two proxies carry a migration stream, without QEMU or a
//! link in the way: a synthetic stream (`migrate::stream::ram_stream`, half its pages
//! held by a donor in this process) written into the source proxy's socket as QEMU would,
//! through mutual TLS on loopback, out of the destination proxy into a socket read as the
//! incoming QEMU would. The source proxy runs on one thread (as `memfabric migrate` did)
//! and on two, in alternating order round by round; the destination on two, as in the
//! daemon. On a fast link the proxies' throughput is the migration's.

use std::{
    fmt::Write as _,
    fs,
    io::{Read as _, Write as _},
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use memfabric::{
    addresses::GuestSpan,
    host::inventory::{Mergeability, RamMapping, Vm, VmKind},
    migrate::{
        Progress,
        holdings::Holdings,
        run::{self, SocketSendOptions},
        stream::{PAGE, ram_stream},
    },
};

struct Sample {
    threads: usize,
    wall_s: f64,
    cpu_s: f64,
}

/// CPU seconds of this process so far (every thread).
fn process_cpu() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_SELF is always valid.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

pub(crate) fn run(out: &Path, mib: usize, rounds: usize) -> anyhow::Result<()> {
    let n = mib << 8;
    // Distinct pages; the even ones are also in the donor's memory.
    let pages: Vec<[u8; PAGE]> = (0..n as u64)
        .map(|i| {
            let mut p = [0u8; PAGE];
            for (k, w) in p.chunks_exact_mut(8).enumerate() {
                w.copy_from_slice(
                    &(i.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ k as u64).to_le_bytes(),
                );
            }
            p
        })
        .collect();
    let stream = Arc::new(ram_stream(&pages));
    let mut donor = vec![0u8; (n / 2 + 1) * PAGE];
    let off = donor.as_ptr().align_offset(PAGE);
    for (j, p) in pages.iter().step_by(2).enumerate() {
        donor[off + j * PAGE..off + (j + 1) * PAGE].copy_from_slice(p);
    }
    drop(pages);
    let base = donor.as_ptr() as u64 + off as u64;
    let vm = Vm {
        pid: std::process::id(),
        kind: VmKind::Qemu,
        name: "donor".into(),
        uuid: None,
        guest_memory_bytes: ((n / 2) * PAGE) as u64,
        ram: vec![RamMapping {
            span: GuestSpan::new(base, base + ((n / 2) * PAGE) as u64),
            backing: "anon".into(),
            mergeable: false,
        }],
        mergeability: Mergeability::Unknown,
        merge_off: false,
    };
    let holdings = Arc::new(Holdings::scan(&[vm], None));
    let dir = std::env::temp_dir().join(format!("memfabric-bench-proxy-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let pki = memfabric_harness::Pki::new("bench proxy");
    let (src_tls, dst_tls) = memfabric_tests::proxy_tls(&pki, &dir);
    let server = dst_tls.load()?.server;
    let dest_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut samples = Vec::new();
    for round in 0..rounds {
        let order = if round % 2 == 0 { [1, 2] } else { [2, 1] };
        for threads in order {
            let send_rt = if threads == 1 {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?
            } else {
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(threads)
                    .enable_all()
                    .build()?
            };
            let (incoming, qemu_socket) = (dir.join("in.sock"), dir.join("out.sock"));
            let _ = fs::remove_file(&incoming);
            // The incoming QEMU: reads everything, holds its end until the proxy closes.
            let sink = std::os::unix::net::UnixListener::bind(&incoming)?;
            let sink = std::thread::spawn(move || -> u64 {
                let Ok((mut c, _)) = sink.accept() else {
                    return 0;
                };
                let mut buf = vec![0u8; 1 << 20];
                let mut got = 0u64;
                while let Ok(k) = c.read(&mut buf) {
                    if k == 0 {
                        break;
                    }
                    got += k as u64;
                }
                got
            });
            let listener = dest_rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
            let addr = listener.local_addr()?;
            let recv = {
                let (server, holdings, incoming) =
                    (server.clone(), holdings.clone(), incoming.clone());
                dest_rt.spawn(async move {
                    run::receive_on(
                        listener,
                        &server,
                        holdings,
                        &incoming,
                        Duration::from_secs(30),
                        None,
                        Arc::new(Progress::default()),
                    )
                    .await
                })
            };
            let sent = send_rt.spawn(run::send_via_socket(
                SocketSendOptions {
                    socket: qemu_socket.clone(),
                    to: addr.to_string(),
                    node: "dst".into(),
                    tls: src_tls.clone(),
                    bandwidth: None,
                    multifd: 0,
                    accept_timeout: Duration::from_secs(30),
                },
                Arc::new(Progress::default()),
            ));
            // QEMU: connects once the proxy listens (a one-thread runtime runs the proxy
            // only inside block_on below), writes the stream, then holds its end.
            let t = Instant::now();
            let cpu = process_cpu();
            let feed = {
                let stream = stream.clone();
                std::thread::spawn(move || {
                    let mut qemu = loop {
                        match std::os::unix::net::UnixStream::connect(&qemu_socket) {
                            Ok(s) => break s,
                            Err(_) => std::thread::sleep(Duration::from_millis(1)),
                        }
                    };
                    let _ = qemu.write_all(&stream);
                    let _ = qemu.shutdown(std::net::Shutdown::Write);
                    let mut rest = Vec::new();
                    let _ = qemu.read_to_end(&mut rest);
                })
            };
            let summary = send_rt.block_on(sent)??;
            let (wall_s, cpu_s) = (t.elapsed().as_secs_f64(), process_cpu() - cpu);
            drop(send_rt);
            let _ = feed.join();
            dest_rt.block_on(recv)??;
            let delivered = sink.join().unwrap_or(0);
            anyhow::ensure!(
                delivered == stream.len() as u64,
                "{delivered} of {} bytes delivered",
                stream.len()
            );
            eprintln!(
                "round {round}, source on {threads} thread(s): {wall_s:.2} s, {cpu_s:.2} s CPU, \
                 {:.0} MB/s, {} referenced",
                stream.len() as f64 / wall_s / 1e6,
                summary.referenced
            );
            samples.push(Sample {
                threads,
                wall_s,
                cpu_s,
            });
        }
    }
    let _ = fs::remove_dir_all(&dir);
    report(out, mib, rounds, stream.len(), &samples)
}

fn report(
    out: &Path,
    mib: usize,
    rounds: usize,
    bytes: usize,
    samples: &[Sample],
) -> anyhow::Result<()> {
    let dir = xtask::report::dir(out, "proxy")?;
    let mut csv = String::from("source_threads,wall_s,cpu_s\n");
    for s in samples {
        writeln!(csv, "{},{:.4},{:.4}", s.threads, s.wall_s, s.cpu_s)?;
    }
    fs::write(dir.join("samples.csv"), csv)?;
    let median = |threads: usize, f: fn(&Sample) -> f64| {
        let mut v: Vec<f64> = samples
            .iter()
            .filter(|s| s.threads == threads)
            .map(f)
            .collect();
        xtask::report::median(&mut v)
    };
    let mut md = format!(
        "# bench proxy: a {mib} MiB guest's stream (half held by the destination), {rounds} \
         rounds\n\n| source proxy threads | wall s (median) | MB/s | CPU s (proxies and stand-in QEMUs) |\n\
         |---|---|---|---|\n"
    );
    for threads in [1, 2] {
        let wall = median(threads, |s| s.wall_s);
        writeln!(
            md,
            "| {threads} | {wall:.2} | {:.0} | {:.2} |",
            bytes as f64 / wall / 1e6,
            median(threads, |s| s.cpu_s)
        )?;
    }
    writeln!(
        md,
        "\nTwo threads take {:.0} % of one thread's time.",
        100.0 * median(2, |s| s.wall_s) / median(1, |s| s.wall_s)
    )?;
    fs::write(dir.join("summary.md"), &md)?;
    println!("{md}");
    println!("report: {}", dir.display());
    Ok(())
}
