//! The credit dashboard: server-rendered HTML with SVG charts drawn on the server.

use std::collections::HashMap;
use std::fmt::Write;

use crate::space::SpaceSnapshot;
use crate::store::{ProjectHistory, Row2, Stats};

/// Escapes text for HTML.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

fn short(key: &str) -> String {
    if key.starts_with("12D3KooW") && key.len() > 20 {
        format!("{}…{}", &key[..12], &key[key.len() - 6..])
    } else {
        key.to_owned()
    }
}

/// A bar chart of credit per day as SVG.
pub fn chart(days: &[(i64, f64)], title: &str) -> String {
    let (w, h, pad) = (640.0, 220.0, 40.0);
    let max = days.iter().map(|d| d.1).fold(0.0f64, f64::max).max(1e-9);
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" aria-label="{}">"#,
        esc(title)
    );
    let _ = write!(
        s,
        r##"<line x1="{pad}" y1="{y}" x2="{x2}" y2="{y}" stroke="#444"/><text x="{pad}" y="16" font-size="13">{} (max {:.1})</text>"##,
        esc(title),
        max,
        y = h - pad,
        x2 = w - 10.0
    );
    let n = days.len().max(1) as f64;
    let bw = ((w - pad - 10.0) / n).min(60.0);
    for (i, (day, credit)) in days.iter().enumerate() {
        let bh = (credit / max) * (h - 2.0 * pad);
        let x = pad + i as f64 * bw + 2.0;
        let _ = write!(
            s,
            r##"<rect class="bar" x="{x:.1}" y="{:.1}" width="{:.1}" height="{bh:.1}" fill="#3a7d44"><title>day {day}: {credit:.2}</title></rect>"##,
            h - pad - bh,
            (bw - 4.0).max(1.0)
        );
    }
    s.push_str("</svg>");
    s
}

fn board(out: &mut String, title: &str, rows: &[Row2], link: Option<&str>) {
    let _ = write!(
        out,
        "<section><h2>{}</h2><table class=\"board\"><tr><th>#</th><th>name</th><th>credit</th><th>CPU hours</th><th>records</th><th>recent avg/day</th></tr>",
        esc(title)
    );
    for (i, r) in rows.iter().enumerate() {
        let name = match link {
            Some(prefix) => format!(
                "<a href=\"{prefix}{}\">{}</a>",
                esc(&r.id),
                esc(&short(&r.key))
            ),
            None => esc(&short(&r.key)),
        };
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{name}</td><td>{:.2}</td><td>{:.3}</td><td>{}</td><td>{:.2}</td></tr>",
            i + 1,
            r.credit,
            r.cpu_hours,
            r.records,
            r.rac
        );
    }
    out.push_str("</table></section>");
}

const STYLE: &str = "body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin-bottom:1em}td,th{padding:4px 10px;border-bottom:1px solid #ddd;text-align:left}section{display:inline-block;vertical-align:top;margin-right:2em}.totals span{margin-right:2em;font-size:1.2em}";

/// The front page; with `space`, a summary of the live space's capacity linking to its page.
pub fn index(s: &Stats, space: Option<&SpaceSnapshot>) -> String {
    let mut o = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Gleaner credit</title><style>{STYLE}</style></head><body><h1>Gleaner credit</h1>"
    );
    let _ = write!(
        o,
        "<p class=\"totals\"><span id=\"total-credit\">credit {:.2}</span><span>CPU hours {:.3}</span><span>records {}</span><span>hosts {}</span></p>",
        s.total_credit, s.total_cpu_hours, s.records, s.hosts
    );
    o.push_str(&chart(&s.per_day, "credit per day"));
    board(&mut o, "Volunteers", &s.volunteers, None);
    board(&mut o, "Teams", &s.teams, None);
    board(&mut o, "Hosts", &s.hosts_board, Some("/host/"));
    board(&mut o, "Projects", &s.projects, Some("/project/"));
    if let Some(sp) = space {
        let _ = write!(
            o,
            "<section id=\"space\"><h2><a href=\"/space\">Space {}</a></h2>",
            esc(&sp.space)
        );
        space_totals(&mut o, sp);
        o.push_str("</section>");
    }
    o.push_str("<p><a href=\"/api/v1/stats\">JSON</a> · <a href=\"/metrics\">metrics</a></p></body></html>");
    o
}

fn space_totals(o: &mut String, sp: &SpaceSnapshot) {
    let t = &sp.totals;
    let _ = write!(
        o,
        "<p class=\"totals\"><span id=\"space-peers\">factories {}</span><span id=\"space-free-cores\">free cores {}</span><span>free memory {:.1} GiB</span><span>running {}</span><span>owner present {}</span></p>",
        t.peers,
        t.free_cores,
        t.free_memory_mib as f64 / 1024.0,
        t.running_machines,
        t.owner_present
    );
}

/// The live space: every factory's latest capacity advert, expiring with it. Machine types are
/// shown by their registered names (`names`, by digest) where known.
pub fn space(sp: &SpaceSnapshot, names: &HashMap<String, String>) -> String {
    let mut o = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"5\"><title>space {0}</title><style>{STYLE}</style></head><body><h1>Space {0}</h1>",
        esc(&sp.space)
    );
    space_totals(&mut o, sp);
    let _ = write!(
        o,
        "<p>this coordinator observes as {} with {} connections; adverts count for {} s without a newer one</p>",
        esc(&short(&sp.peer_id)),
        sp.connected,
        sp.advert_ttl_s
    );
    o.push_str("<section><table class=\"board\" id=\"space-peers-table\"><tr><th>factory</th><th>free cores</th><th>free memory MiB</th><th>free disk MiB</th><th>engines</th><th>running</th><th>owner</th><th>benchmark</th><th>advert age s</th></tr>");
    for p in &sp.peers {
        let running = p
            .running
            .iter()
            .map(|r| {
                let name = names
                    .get(&r.machine_type)
                    .cloned()
                    .unwrap_or_else(|| format!("{}…", r.machine_type.get(..12).unwrap_or("")));
                format!("{} ×{}", esc(&name), r.count)
            })
            .collect::<Vec<_>>()
            .join(", ");
        let owner = match (p.owner_present, p.draining) {
            (_, true) => "draining",
            (true, false) => "present",
            (false, false) => "away",
        };
        let _ = write!(
            o,
            "<tr class=\"peer\"><td title=\"{}\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{running}</td><td>{owner}</td><td>{}</td><td>{}</td></tr>",
            esc(&p.host),
            esc(&short(&p.host)),
            p.free_cores,
            p.free_memory_mib,
            p.free_disk_mib,
            esc(&p.backends.join(" ")),
            p.benchmark,
            p.age_s
        );
    }
    o.push_str("</table></section><p><a href=\"/api/space\">JSON</a> · <a href=\"/\">back</a></p></body></html>");
    o
}

/// A host's page.
pub fn host(id: &str, days: &[(i64, f64)]) -> String {
    let total: f64 = days.iter().map(|d| d.1).sum();
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>host {0}</title><style>{STYLE}</style></head><body><h1>Host {0}</h1><p>credit {total:.2}</p>{1}<p><a href=\"/\">back</a></p></body></html>",
        esc(id),
        chart(days, "credit per day")
    )
}

/// A project's page: totals, credit per day and its machine types.
pub fn project(p: &ProjectHistory) -> String {
    let mut o = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>project {0}</title><style>{STYLE}</style></head><body><h1>Project {0}</h1><p class=\"id\">{1}</p>",
        esc(&p.name),
        esc(&p.id)
    );
    let _ = write!(
        o,
        "<p class=\"totals\"><span id=\"project-credit\">credit {:.2}</span><span>CPU hours {:.3}</span><span>records {}</span><span>hosts {}</span></p>",
        p.credit, p.cpu_hours, p.records, p.hosts
    );
    o.push_str(&chart(&p.per_day, "credit per day"));
    o.push_str("<section><h2>Machine types</h2><table class=\"board\"><tr><th>name</th><th>digest</th><th>credit</th><th>records</th></tr>");
    for m in &p.machine_types {
        let _ = write!(
            o,
            "<tr><td>{}</td><td><a href=\"/project/{}\">{}…</a></td><td>{:.2}</td><td>{}</td></tr>",
            esc(m.name.as_deref().unwrap_or("(unregistered)")),
            esc(&m.digest),
            esc(m.digest.get(..12).unwrap_or(&m.digest)),
            m.credit,
            m.records
        );
    }
    let _ = write!(
        o,
        "</table></section><p><a href=\"/api/v1/project/{}\">JSON</a> · <a href=\"/\">back</a></p></body></html>",
        esc(&p.id)
    );
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_draws_bars() {
        assert_eq!(esc("<a href='x'>&"), "&lt;a href=&#39;x&#39;&gt;&amp;");
        let svg = chart(&[(1, 1.0), (2, 3.0)], "t<");
        assert_eq!(svg.matches("<rect class=\"bar\"").count(), 2);
        assert!(svg.contains("t&lt;"));
    }

    #[test]
    fn space_page_names_known_types_and_escapes() {
        use crate::space::{PeerCapacity, RunningType, SpaceTotals};
        let peer = |host: &str, owner| PeerCapacity {
            host: host.into(),
            free_cores: 3,
            free_memory_mib: 2048,
            free_disk_mib: 0,
            backends: vec!["docker".into()],
            running: vec![RunningType {
                machine_type: "ab".repeat(32),
                count: 2,
            }],
            owner_present: owner,
            draining: false,
            benchmark: 1000,
            seq: 1,
            advert_at: 0,
            age_s: 1,
            expires_in_s: 59,
        };
        let sp = SpaceSnapshot {
            space: "d<emo".into(),
            totals: SpaceTotals {
                peers: 2,
                free_cores: 6,
                ..Default::default()
            },
            peers: vec![peer("h1", false), peer("<h2>", true)],
            ..Default::default()
        };
        let names = HashMap::from([("ab".repeat(32), "hashing".to_string())]);
        let html = space(&sp, &names);
        assert_eq!(html.matches("<tr class=\"peer\">").count(), 2);
        assert!(html.contains("hashing ×2") && html.contains("present") && html.contains("away"));
        assert!(html.contains("d&lt;emo") && html.contains("&lt;h2&gt;"));
        assert!(!html.contains("<h2>h2"));
        let front = index(&Stats::default(), Some(&sp));
        assert!(front.contains("free cores 6"), "{front}");
        assert!(!index(&Stats::default(), None).contains("id=\"space\""));
    }
}
