//! Human-readable text for the daemon's answers (`gleaner status`, `credit`, `events`...); `--json`
//! prints the same data raw for scripts.

use std::fmt::Write;

use serde_json::Value;

use crate::control::Request;

fn secs(v: &Value) -> f64 {
    v.as_f64().unwrap_or(0.0)
}

fn events(out: &mut String, list: &Value, last: usize) {
    let items = list.as_array().map(Vec::as_slice).unwrap_or(&[]);
    for e in items.iter().rev().take(last).rev() {
        let _ = writeln!(
            out,
            "  {}  {}{}",
            e["at"],
            e["machine"]
                .as_str()
                .map(|m| format!("[{}] ", &m[..8.min(m.len())]))
                .unwrap_or_default(),
            e["message"].as_str().unwrap_or("")
        );
    }
}

/// The coordinator's part of `gleaner credit`.
fn coordinator(out: &mut String, c: &Value) {
    let url = c["url"].as_str().unwrap_or("?");
    if c["configured"].as_bool() != Some(true) {
        out.push_str("coordinator: none configured (credit stays in the local ledger)\n");
    } else if c["reachable"].as_bool() != Some(true) {
        let _ = writeln!(
            out,
            "coordinator unreachable: {} (the ledger keeps the records until it is back)",
            c["error"].as_str().unwrap_or("no answer")
        );
    } else if c["known"].as_bool() != Some(true) {
        let _ = writeln!(
            out,
            "coordinator {url}\n  no records from this host yet (not enrolled, or nothing delivered)"
        );
    } else {
        let _ = writeln!(
            out,
            "coordinator {url}\n  credit             {:.2}\n  cpu time           {:.2} h in {} records{}",
            secs(&c["credit"]),
            secs(&c["cpu_hours"]),
            c["records"],
            c["account"]
                .as_str()
                .map(|a| format!("\n  account            {a}"))
                .unwrap_or_default()
        );
    }
}

fn errors(out: &mut String, list: &Value) {
    for e in list.as_array().into_iter().flatten() {
        let _ = writeln!(out, "  warning: {}", e.as_str().unwrap_or("?"));
    }
}

/// Renders the answer to `req` for a person.
pub fn render(req: &Request, v: &Value) -> String {
    let mut out = String::new();
    match req {
        Request::Status => {
            let f = &v["factory"];
            let a = &f["allowance"];
            let _ = writeln!(out, "host      {}", v["host"].as_str().unwrap_or("?"));
            let state = if v["paused"].as_bool() == Some(true) {
                "paused by the owner".to_string()
            } else if f["draining"].as_bool() == Some(true) {
                "draining".to_string()
            } else {
                a["reason"].as_str().unwrap_or("").to_string()
            };
            let _ = writeln!(out, "state     {state}");
            let paused: Vec<&str> = v["paused_types"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|t| t["name"].as_str())
                .collect();
            if !paused.is_empty() {
                let _ = writeln!(
                    out,
                    "paused by you  {} (`gleaner resume NAME` to let them run)",
                    paused.join(", ")
                );
            }
            let _ = writeln!(
                out,
                "limits    {} cores, {:.1} GiB, at most {} machines",
                a["cores"],
                secs(&a["memory_bytes"]) / f64::from(1u32 << 30),
                a["max_machines"]
            );
            for (i, e) in v["engines"].as_array().into_iter().flatten().enumerate() {
                let label = if i == 0 { "engines" } else { "" };
                let _ = writeln!(out, "{label:<9} {}", e.as_str().unwrap_or("?"));
            }
            let machines = f["machines"].as_array().map(Vec::as_slice).unwrap_or(&[]);
            let _ = writeln!(out, "machines  {}", machines.len());
            for m in machines {
                let _ = writeln!(
                    out,
                    "  {}  {:<20} {:<10} {} cores  cpu {:.1} s  mem {:.0} MiB",
                    &m["machine_id"].as_str().unwrap_or("?")[..8],
                    m["name"].as_str().unwrap_or("?"),
                    m["state"].as_str().unwrap_or("?"),
                    m["cores"],
                    secs(&m["cpu_seconds"]),
                    secs(&m["memory_now_bytes"]) / 1048576.0
                );
            }
            let offers = f["offers"].as_array().map(Vec::as_slice).unwrap_or(&[]);
            let _ = writeln!(out, "machine types  {}", offers.len());
            for o in offers {
                let mut backoff = o["backed_off_until"]
                    .as_u64()
                    .map(|t| format!("  backed off until {t}"))
                    .unwrap_or_default();
                if o["paused"].as_bool() == Some(true) {
                    backoff.push_str("  paused (by you)");
                }
                let _ = writeln!(
                    out,
                    "  {:<20} v{:<4} share {}  running {}{backoff}",
                    o["name"].as_str().unwrap_or("?"),
                    o["version"],
                    o["share"],
                    o["running"]
                );
            }
            let l = &v["ledger"];
            let _ = writeln!(
                out,
                "credit    {:.1} cpu s recorded; {} records delivered, {} waiting, {} refused",
                secs(&l["cpu_ms"]) / 1000.0,
                l["delivered"],
                l["pending"],
                l["rejected"]
            );
            let _ = writeln!(out, "recent events");
            events(&mut out, &f["events"], 8);
        }
        Request::Credit => {
            let _ = writeln!(
                out,
                "this host's ledger\n  cpu time recorded  {:.1} s\n  delivered          {:.1} s in {} records\n  waiting            {} records\n  refused            {} records",
                secs(&v["cpu_ms"]) / 1000.0,
                secs(&v["delivered_cpu_ms"]) / 1000.0,
                v["delivered"],
                v["pending"],
                v["rejected"]
            );
            coordinator(&mut out, &v["coordinator"]);
        }
        Request::Events => events(&mut out, v, 200),
        Request::Space => {
            let n = |k: &str| v[k].as_u64().unwrap_or(0);
            let _ = writeln!(
                out,
                "space {}  ({} connected, {} opened and {} closed as surplus in all; messages: {} rejected, {} replayed, {} over a sender's rate; {} machine-type requests throttled)\nme    {}",
                v["space"].as_str().unwrap_or("?"),
                v["connected"],
                n("opened"),
                n("trimmed"),
                n("rejected_messages"),
                n("replayed"),
                n("rate_limited"),
                n("mt_throttled"),
                v["peer_id"].as_str().unwrap_or("?")
            );
            let r = |k: &str| v["relay"][k].as_u64().unwrap_or(0);
            let _ = writeln!(
                out,
                "relay {} links opened here, {} by peers ({} on connections of their own); {} refreshes taken, {} copies of adverts heard, {} prunes and {} grafts sent, {} dropped",
                r("outbound"),
                r("inbound"),
                r("direct"),
                r("refreshes"),
                r("duplicates"),
                r("prunes_sent"),
                r("grafts_sent"),
                r("dropped")
            );
            for p in v["peers"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
                let running: u64 = p["running"]
                    .as_array()
                    .map(|r| r.iter().filter_map(|x| x[1].as_u64()).sum())
                    .unwrap_or(0);
                let _ = writeln!(
                    out,
                    "  {}  free {} cores {} MiB  running {running}{}{}",
                    p["host"].as_str().unwrap_or("?"),
                    p["free_cores"],
                    p["free_memory_mib"],
                    if p["owner_present"].as_bool() == Some(true) {
                        "  owner present"
                    } else {
                        ""
                    },
                    if p["draining"].as_bool() == Some(true) {
                        "  draining"
                    } else {
                        ""
                    }
                );
            }
        }
        Request::Pause { .. } => {
            let until = v["until"]
                .as_u64()
                .map(|u| format!(" until {u}"))
                .unwrap_or_default();
            match v["machine_type"].as_str() {
                Some(name) => {
                    let _ = writeln!(
                        out,
                        "paused {name}{until}: {} machines frozen, none will start; other types keep running",
                        v["machines_frozen"]
                    );
                }
                None => {
                    let _ = writeln!(out, "paused{until}");
                }
            }
            errors(&mut out, &v["errors"]);
        }
        Request::Resume { .. } => {
            match v["machine_type"].as_str() {
                Some(name) if v["still_frozen"].as_u64().unwrap_or(0) > 0 => {
                    let _ = writeln!(
                        out,
                        "resumed {name}: its {} machines stay frozen while the whole host is paused (`gleaner resume`)",
                        v["still_frozen"]
                    );
                }
                Some(name) => {
                    let _ = writeln!(
                        out,
                        "resumed {name}: {} machines thawed",
                        v["machines_thawed"]
                    );
                }
                None => {
                    out.push_str("resumed\n");
                    let still: Vec<&str> = v["paused_types"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|t| t.as_str())
                        .collect();
                    if !still.is_empty() {
                        let _ = writeln!(
                            out,
                            "still paused by you: {} (`gleaner resume NAME`)",
                            still.join(", ")
                        );
                    }
                }
            }
            errors(&mut out, &v["errors"]);
        }
        Request::Drain { .. } => out.push_str("draining: no new machines will start\n"),
        Request::Undrain => out.push_str("drain lifted\n"),
        _ => {
            let _ = writeln!(out, "{v}");
        }
    }
    out
}

#[cfg(test)]
mod space_tests {
    use super::*;

    #[test]
    fn the_space_line_shows_every_abuse_counter() {
        let v = serde_json::json!({"space": "dept", "connected": 3, "opened": 37, "trimmed": 29, "rejected_messages": 2,
            "replayed": 5, "rate_limited": 7, "mt_throttled": 11, "peer_id": "12D3", "peers": [],
            "relay": {"outbound": 3, "inbound": 4, "direct": 6, "refreshes": 31, "duplicates": 13, "prunes_sent": 17,
                "grafts_sent": 19, "dropped": 23}});
        let text = render(&Request::Space, &v);
        assert!(
            text.contains(
                "relay 3 links opened here, 4 by peers (6 on connections of their own); 31 refreshes taken, 13 copies of adverts heard, 17 prunes and 19 grafts sent, 23 dropped"
            ),
            "{text}"
        );
        assert!(
            text.contains("3 connected, 37 opened and 29 closed as surplus in all"),
            "{text}"
        );
        assert!(
            text.contains(
                "2 rejected, 5 replayed, 7 over a sender's rate; 11 machine-type requests throttled"
            ),
            "{text}"
        );
    }
}
