//! Rendering: draws the model and turns clicks and typing into [`Msg`]s. Nothing here changes
//! state; every widget a test may press is recorded by name in [`Hits`].

use std::collections::BTreeMap;

use eframe::egui::{self, Color32, RichText, Ui};
use egui_plot::{Bar, BarChart, Plot};
use gleaner::policy::Preset;

use crate::limits::{Field, LimitsForm};
use crate::model::{Ask, Connection, Model, Msg, Notice, View};
use crate::status::{Owner, bytes_words, coordinator_sentence, duration_words, headline};

/// Where each named widget was drawn this frame (tests click them by name).
#[derive(Debug, Default, Clone)]
pub struct Hits(pub BTreeMap<String, egui::Rect>);

impl Hits {
    fn put(&mut self, name: impl Into<String>, r: &egui::Response) -> bool {
        self.0.insert(name.into(), r.rect);
        r.clicked()
    }
}

const GREEN: Color32 = Color32::from_rgb(0x2e, 0x8b, 0x57);
const AMBER: Color32 = Color32::from_rgb(0xc8, 0x86, 0x0a);
const RED: Color32 = Color32::from_rgb(0xc0, 0x39, 0x2b);

/// Draws the whole window; returns the owner's messages.
pub fn draw(ui: &mut Ui, m: &Model, now_ms: u64, hits: &mut Hits) -> Vec<Msg> {
    let mut out = Vec::new();
    egui::Panel::top("tabs").show(ui, |ui| {
        ui.add_space(4.0);
        ui.horizontal(|ui| {
            ui.heading(RichText::new("Gleaner").strong());
            ui.add_space(16.0);
            if m.connection == Connection::Up {
                for v in View::ALL {
                    let r = ui.selectable_label(m.view == v, RichText::new(v.title()).size(16.0));
                    if hits.put(format!("tab-{}", v.title().to_lowercase()), &r) {
                        out.push(Msg::Show(v));
                    }
                }
            }
        });
        ui.add_space(4.0);
    });
    egui::CentralPanel::default().show(ui, |ui| {
        egui::ScrollArea::vertical().show(ui, |ui| match &m.connection {
            Connection::Connecting => {
                ui.add_space(40.0);
                ui.vertical_centered(|ui| {
                    ui.spinner();
                    ui.label("Connecting to the Gleaner daemon…");
                });
            }
            Connection::Down(p) => problem(ui, p),
            Connection::Up => match m.view {
                View::Status => status(ui, m, now_ms, hits, &mut out),
                View::Limits => limits(ui, m, hits, &mut out),
                View::Projects => projects(ui, m, hits, &mut out),
                View::Credit => credit(ui, m, hits, &mut out),
            },
        });
    });
    out
}

fn notice(ui: &mut Ui, n: &Option<Notice>) {
    if let Some(n) = n {
        let c = if n.ok { GREEN } else { RED };
        ui.label(RichText::new(&n.text).color(c));
    }
}

fn problem(ui: &mut Ui, p: &crate::model::Problem) {
    let (title, why, fix) = p.explain();
    ui.add_space(30.0);
    ui.vertical_centered(|ui| {
        ui.label(RichText::new("⚠").size(48.0).color(AMBER));
        ui.heading(RichText::new(title).strong());
    });
    ui.add_space(12.0);
    ui.label(why);
    ui.add_space(12.0);
    ui.label(RichText::new("How to fix it:").strong());
    for f in fix {
        ui.label(RichText::new(f).monospace());
    }
    ui.add_space(12.0);
    ui.label(RichText::new("This window retries every few seconds.").weak());
}

fn status(ui: &mut Ui, m: &Model, now_ms: u64, hits: &mut Hits, out: &mut Vec<Msg>) {
    let Some(s) = &m.status else {
        ui.spinner();
        return;
    };
    let now = now_ms / 1000;
    let h = headline(s, now);
    let color = match (s.paused, h.owner) {
        (true, _) => AMBER,
        (_, Owner::Away) => GREEN,
        (_, Owner::Present) => AMBER,
        _ => ui.visuals().text_color(),
    };
    ui.add_space(6.0);
    ui.label(RichText::new(&h.title).size(22.0).strong().color(color));
    ui.label(&h.why);
    ui.add_space(8.0);
    ui.horizontal(|ui| {
        let busy = m.busy.contains(&Ask::Pause) || m.busy.contains(&Ask::Resume);
        ui.add_enabled_ui(!busy, |ui| {
            if s.paused {
                let r = ui.button(RichText::new("▶ Resume").size(16.0));
                if hits.put("resume", &r) {
                    out.push(Msg::Resume);
                }
                let r = ui.button("Snooze 1 more hour");
                if hits.put("pause-1h", &r) {
                    out.push(Msg::Snooze { minutes: 60 });
                }
            } else {
                let r = ui.button(RichText::new("⏸ Pause").size(16.0));
                if hits.put("pause", &r) {
                    out.push(Msg::Pause { minutes: None });
                }
                let r = ui.button("Pause for 1 hour");
                if hits.put("pause-1h", &r) {
                    out.push(Msg::Pause { minutes: Some(60) });
                }
                let r = ui.menu_button("Snooze…", |ui| {
                    for (label, min) in [
                        ("15 minutes", 15),
                        ("30 minutes", 30),
                        ("2 hours", 120),
                        ("until tomorrow (8 hours)", 480),
                    ] {
                        let r = ui.button(label);
                        if hits.put(format!("snooze-{min}"), &r) {
                            out.push(Msg::Snooze { minutes: min });
                            ui.close();
                        }
                    }
                });
                hits.put("snooze", &r.response);
            }
        });
    });
    notice(ui, &m.status_notice);
    ui.add_space(10.0);
    ui.separator();
    let a = &s.factory.allowance;
    ui.label(
        RichText::new(format!(
            "Allowed now: {}, {}, at most {}{}",
            plural(u64::from(a.cores), "core"),
            bytes_words(a.memory_bytes),
            plural(a.max_machines as u64, "machine"),
            if a.may_start {
                ""
            } else {
                " (not starting new work)"
            }
        ))
        .weak(),
    );
    ui.add_space(6.0);
    if s.factory.machines.is_empty() {
        ui.label("Nothing runs right now.");
    } else {
        ui.label(RichText::new("What runs").strong().size(16.0));
        egui::Grid::new("machines")
            .striped(true)
            .num_columns(6)
            .spacing([18.0, 6.0])
            .show(ui, |ui| {
                for t in [
                    "Machine type",
                    "Project",
                    "State",
                    "CPU now",
                    "Memory now",
                    "Time left",
                ] {
                    ui.label(RichText::new(t).strong());
                }
                ui.end_row();
                for mc in &s.factory.machines {
                    ui.label(&mc.name);
                    ui.label(short_id(&mc.publisher));
                    let state_color = if mc.state == "running" { GREEN } else { AMBER };
                    ui.label(RichText::new(&mc.state).color(state_color));
                    let cpu = m
                        .cpu_now
                        .get(&mc.machine_id)
                        .map(|c| {
                            format!(
                                "{:.0} % of {}",
                                c * 100.0,
                                plural(u64::from(mc.cores), "core")
                            )
                        })
                        .unwrap_or_else(|| "measuring…".into());
                    ui.label(cpu);
                    ui.label(format!(
                        "{} of {}",
                        bytes_words(mc.memory_now_bytes),
                        bytes_words(mc.memory_bytes)
                    ));
                    ui.label(if mc.shutdown_at > now {
                        duration_words(mc.shutdown_at - now)
                    } else {
                        "finishing".into()
                    });
                    ui.end_row();
                }
            });
    }
    if !s.factory.offers.is_empty() {
        // Pause one project's machine type while the others keep running (kept across restarts).
        ui.add_space(6.0);
        ui.label(RichText::new("Machine types").strong().size(16.0));
        let busy = m.busy.contains(&Ask::Pause) || m.busy.contains(&Ask::Resume);
        egui::Grid::new("types")
            .striped(true)
            .num_columns(3)
            .spacing([18.0, 6.0])
            .show(ui, |ui| {
                for (i, o) in s.factory.offers.iter().enumerate() {
                    ui.label(format!("{} v{}", o.name, o.version));
                    ui.label(if o.paused {
                        RichText::new("paused by you").color(AMBER)
                    } else {
                        RichText::new(format!("{} running", o.running))
                    });
                    let label = if o.paused { "▶ Resume" } else { "⏸ Pause" };
                    let r = ui.add_enabled(!busy, egui::Button::new(label));
                    if hits.put(format!("pause-type-{i}"), &r) {
                        out.push(Msg::PauseType {
                            digest: o.machine_type.clone(),
                            paused: !o.paused,
                        });
                    }
                    ui.end_row();
                }
            });
    }
    ui.add_space(10.0);
    let t = &s.ledger;
    ui.label(format!(
        "Given so far: {:.2} CPU hours in {} records ({} delivered, {} waiting to be sent).",
        t.cpu_ms as f64 / 3.6e6,
        t.pending + t.delivered,
        t.delivered,
        t.pending
    ));
    if !s.sources.is_empty() {
        ui.label(
            RichText::new(format!(
                "Watching for you through: {}",
                s.sources.join("; ")
            ))
            .weak(),
        );
    }
    if !s.factory.events.is_empty() {
        ui.add_space(8.0);
        ui.collapsing("Recent events", |ui| {
            for e in s.factory.events.iter().rev().take(8) {
                ui.label(RichText::new(&e.message).small());
            }
        });
    }
}

fn plural(n: u64, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

fn short_id(s: &str) -> String {
    if s.chars().count() > 12 {
        format!("{}…", s.chars().take(12).collect::<String>())
    } else {
        s.to_owned()
    }
}

/// The form being drawn and the field its validation blames, if any.
struct FormView<'a> {
    form: &'a LimitsForm,
    error: Option<Field>,
}

fn field(
    ui: &mut Ui,
    fv: &FormView,
    f: Field,
    label: &str,
    hint: &str,
    hits: &mut Hits,
    out: &mut Vec<Msg>,
) {
    let (form, error) = (fv.form, fv.error);
    ui.label(label);
    let mut text = form.get(f).to_owned();
    let mut edit = egui::TextEdit::singleline(&mut text).hint_text(hint);
    if error == Some(f) {
        edit = edit.text_color(RED);
    }
    let r = ui.add_sized([170.0, 22.0], edit);
    hits.put(f.id(), &r);
    if error == Some(f) {
        ui.label(RichText::new("✖").color(RED));
    } else {
        ui.label("");
    }
    if r.changed() {
        out.push(Msg::Edit(f, text));
    }
    ui.end_row();
}

fn limits(ui: &mut Ui, m: &Model, hits: &mut Hits, out: &mut Vec<Msg>) {
    ui.add_space(6.0);
    ui.label(RichText::new("Presets").strong().size(16.0));
    ui.horizontal(|ui| {
        for (p, words) in [
            (Preset::OnlyWhenIdle, "Only when I'm away"),
            (Preset::AlwaysGently, "Always, gently"),
            (Preset::NightsAndWeekends, "Nights and weekends"),
        ] {
            let on = m.form.as_ref().and_then(|f| f.preset) == Some(p);
            let r = ui.selectable_label(on, words);
            if hits.put(format!("preset-{}", p.name()), &r) {
                out.push(Msg::Preset(p));
            }
        }
    });
    let Some(form) = &m.form else {
        ui.spinner();
        return;
    };
    let error = m.form_check.as_ref().err().and_then(|e| e.field);
    let fv = FormView { form, error };
    ui.add_space(8.0);
    ui.label(RichText::new("When you are away").strong());
    egui::Grid::new("away")
        .num_columns(3)
        .spacing([12.0, 6.0])
        .show(ui, |ui| {
            field(ui, &fv, Field::Cores, "Cores", "4 or 50%", hits, out);
            field(
                ui,
                &fv,
                Field::CpuUsage,
                "CPU use per core",
                "100%",
                hits,
                out,
            );
            field(ui, &fv, Field::Memory, "Memory", "4GiB or 50%", hits, out);
            field(
                ui,
                &fv,
                Field::MaxMachines,
                "Machines at once",
                "2",
                hits,
                out,
            );
            field(
                ui,
                &fv,
                Field::IdleAfter,
                "Away after idle for",
                "5m",
                hits,
                out,
            );
        });
    ui.add_space(8.0);
    ui.label(RichText::new("While you use the computer").strong());
    ui.horizontal(|ui| {
        let r = ui.radio(!form.present_runs, "Freeze all work");
        if hits.put("present-freeze", &r) {
            out.push(Msg::PresentRuns(false));
        }
        let r = ui.radio(form.present_runs, "Keep running within:");
        if hits.put("present-run", &r) {
            out.push(Msg::PresentRuns(true));
        }
    });
    if form.present_runs {
        egui::Grid::new("present")
            .num_columns(3)
            .spacing([12.0, 6.0])
            .show(ui, |ui| {
                field(ui, &fv, Field::PresentCores, "Cores", "1", hits, out);
                field(ui, &fv, Field::PresentMemory, "Memory", "25%", hits, out);
            });
    }
    ui.add_space(8.0);
    ui.label(RichText::new("Also").strong());
    let mut battery = form.run_on_battery;
    let r = ui.checkbox(&mut battery, "Run on battery");
    if hits.put("run-on-battery", &r) {
        out.push(Msg::RunOnBattery(battery));
    }
    egui::Grid::new("more")
        .num_columns(3)
        .spacing([12.0, 6.0])
        .show(ui, |ui| {
            field(
                ui,
                &fv,
                Field::SuspendAboveLoad,
                "Freeze when other load exceeds",
                "3, 75% or off",
                hits,
                out,
            );
            field(
                ui,
                &fv,
                Field::StopAfterFrozen,
                "Stop work frozen longer than",
                "4h or never",
                hits,
                out,
            );
            field(
                ui,
                &fv,
                Field::ExclusiveApps,
                "Freeze while these run",
                "blender, steam",
                hits,
                out,
            );
        });
    ui.add_space(8.0);
    ui.horizontal(|ui| {
        ui.label(RichText::new("Schedule").strong());
        ui.label(
            RichText::new(if form.schedule.is_empty() {
                "(any time)"
            } else {
                "(only in these hours)"
            })
            .weak(),
        );
        let r = ui.small_button("+ add hours");
        if hits.put("schedule-add", &r) {
            out.push(Msg::AddWindow);
        }
    });
    egui::Grid::new("schedule")
        .num_columns(4)
        .spacing([12.0, 6.0])
        .show(ui, |ui| {
            for i in 0..form.schedule.len() {
                for (f, w) in [
                    (Field::ScheduleDays(i), 120.0),
                    (Field::ScheduleFrom(i), 60.0),
                    (Field::ScheduleTo(i), 60.0),
                ] {
                    let mut text = form.get(f).to_owned();
                    let mut e = egui::TextEdit::singleline(&mut text);
                    if error == Some(f) {
                        e = e.text_color(RED);
                    }
                    let r = ui.add_sized([w, 22.0], e);
                    hits.put(f.id(), &r);
                    if r.changed() {
                        out.push(Msg::Edit(f, text));
                    }
                }
                let r = ui.small_button("remove");
                if hits.put(format!("schedule-remove-{i}"), &r) {
                    out.push(Msg::RemoveWindow(i));
                }
                ui.end_row();
            }
        });
    ui.add_space(10.0);
    match &m.form_check {
        Ok(summary) => {
            ui.label(RichText::new(format!("✔ {summary}")).color(GREEN));
        }
        Err(e) => {
            ui.label(
                RichText::new(format!("✖ {}: {}", e.key, e.reason))
                    .color(RED)
                    .strong(),
            );
        }
    }
    ui.horizontal(|ui| {
        let ok = m.form_check.is_ok() && !m.busy.contains(&Ask::Limits);
        let r = ui.add_enabled(ok, egui::Button::new(RichText::new("Apply").size(16.0)));
        if hits.put("limits-apply", &r) {
            out.push(Msg::ApplyLimits);
        }
        let r = ui.button("Revert");
        if hits.put("limits-revert", &r) {
            out.push(Msg::RevertLimits);
        }
    });
    notice(ui, &m.limits_notice);
}

fn projects(ui: &mut Ui, m: &Model, hits: &mut Hits, out: &mut Vec<Msg>) {
    ui.add_space(6.0);
    ui.label(RichText::new("Trusted projects").strong().size(16.0));
    let rows = m.projects();
    if rows.is_empty() {
        ui.label("No project is trusted yet: add one below.");
    } else {
        egui::Grid::new("projects")
            .striped(true)
            .num_columns(6)
            .spacing([18.0, 6.0])
            .show(ui, |ui| {
                for t in [
                    "Publisher",
                    "Share",
                    "May use",
                    "Machine types",
                    "Running",
                    "",
                ] {
                    ui.label(RichText::new(t).strong());
                }
                ui.end_row();
                for (i, r) in rows.iter().enumerate() {
                    let who = if r.source == "settings" {
                        " (by the settings)"
                    } else {
                        ""
                    };
                    ui.label(RichText::new(format!("{}{who}", short_id(&r.publisher))).monospace())
                        .on_hover_text(&r.publisher);
                    ui.label(format!("{}", r.share));
                    ui.label(&r.allows);
                    let mut types = if r.types.is_empty() {
                        "none here yet".to_owned()
                    } else {
                        r.types.join(", ")
                    };
                    if r.backed_off {
                        types.push_str(" (backing off after failures)");
                    }
                    ui.label(types);
                    ui.label(r.running.to_string());
                    let b = ui.small_button("Stop trusting");
                    if hits.put(format!("untrust-{i}"), &b) {
                        out.push(Msg::Untrust(r.publisher.clone()));
                    }
                    ui.end_row();
                }
            });
    }
    ui.add_space(12.0);
    ui.separator();
    ui.label(RichText::new("Add a project").strong().size(16.0));
    egui::Grid::new("add")
        .num_columns(3)
        .spacing([12.0, 6.0])
        .show(ui, |ui| {
            ui.label("Share of this computer");
            let mut share = m.share.clone();
            let r = ui.add_sized([60.0, 22.0], egui::TextEdit::singleline(&mut share));
            hits.put("share", &r);
            if r.changed() {
                out.push(Msg::ShareText(share));
            }
            ui.label("");
            ui.end_row();
            ui.label("By publisher key");
            let mut key = m.trust_key.clone();
            let r = ui.add_sized(
                [420.0, 22.0],
                egui::TextEdit::singleline(&mut key).hint_text("the project's key"),
            );
            hits.put("trust-key", &r);
            if r.changed() {
                out.push(Msg::TrustKeyText(key));
            }
            let b = ui.add_enabled(!m.busy.contains(&Ask::Trust), egui::Button::new("Trust"));
            if hits.put("trust-key-button", &b) {
                out.push(Msg::TrustKey);
            }
            ui.end_row();
            ui.label("By signed machine-type file");
            let mut path = m.file_path.clone();
            let r = ui.add_sized(
                [420.0, 22.0],
                egui::TextEdit::singleline(&mut path).hint_text("/path/to/type.gmt"),
            );
            hits.put("trust-file", &r);
            if r.changed() {
                out.push(Msg::FilePathText(path));
            }
            let b = ui.button("Open");
            if hits.put("trust-file-open", &b) {
                out.push(Msg::OpenFile);
            }
            ui.end_row();
        });
    if let Some(c) = &m.candidate {
        ui.add_space(8.0);
        egui::Frame::group(ui.style()).show(ui, |ui| {
            ui.label(RichText::new("Check before trusting: the signature is valid").strong());
            if let Some(w) = &c.warning {
                ui.label(RichText::new(format!("⚠ {w}")).color(AMBER));
            }
            egui::Grid::new("candidate")
                .num_columns(2)
                .spacing([12.0, 4.0])
                .show(ui, |ui| {
                    for (k, v) in &c.details {
                        ui.label(RichText::new(k).weak());
                        ui.label(v);
                        ui.end_row();
                    }
                });
            ui.horizontal(|ui| {
                let b = ui.add_enabled(
                    !m.busy.contains(&Ask::Trust),
                    egui::Button::new("Trust this publisher"),
                );
                if hits.put("trust-file-confirm", &b) {
                    out.push(Msg::TrustFile);
                }
                let b = ui.button("Cancel");
                if hits.put("trust-file-cancel", &b) {
                    out.push(Msg::CancelFile);
                }
            });
        });
    }
    notice(ui, &m.projects_notice);
}

fn credit(ui: &mut Ui, m: &Model, hits: &mut Hits, out: &mut Vec<Msg>) {
    ui.add_space(6.0);
    let Some(c) = &m.credit else {
        ui.spinner();
        return;
    };
    let t = &c.totals;
    let est: f64 = c.by_project.iter().map(|p| p.credit).sum();
    ui.label(
        RichText::new(format!("{:.2} CPU hours given", t.cpu_ms as f64 / 3.6e6))
            .size(22.0)
            .strong(),
    );
    ui.label(format!(
        "{} records: {} acknowledged by the coordinator, {} waiting to be sent, {} refused.{}",
        t.pending + t.delivered,
        t.delivered,
        t.pending,
        t.rejected,
        if c.by_project.is_empty() {
            String::new()
        } else {
            format!(" About {est:.1} credit (the coordinator's figure is final).")
        }
    ));
    if let Some(co) = &c.coordinator {
        ui.label(coordinator_sentence(co));
    }
    let r = ui.small_button("Refresh");
    if hits.put("credit-refresh", &r) {
        out.push(Msg::RefreshCredit);
    }
    ui.add_space(8.0);
    ui.label(RichText::new("Per project").strong().size(16.0));
    if c.by_project.is_empty() {
        ui.label("No finished work yet: credit appears as machines finish or report.");
    } else {
        egui::Grid::new("by-project")
            .striped(true)
            .num_columns(5)
            .spacing([18.0, 6.0])
            .show(ui, |ui| {
                for h in ["Project", "Machine type", "Records", "CPU hours", "Credit"] {
                    ui.label(RichText::new(h).strong());
                }
                ui.end_row();
                for p in &c.by_project {
                    ui.label(RichText::new(short_id(&p.publisher)).monospace());
                    ui.label(
                        m.type_name(&p.machine_type)
                            .unwrap_or_else(|| short_id(&p.machine_type)),
                    );
                    ui.label(p.records.to_string());
                    ui.label(format!("{:.3}", p.cpu_ms as f64 / 3.6e6));
                    ui.label(format!("{:.2}", p.credit));
                    ui.end_row();
                }
            });
    }
    ui.add_space(8.0);
    ui.label(RichText::new("Per day").strong().size(16.0));
    let bars: Vec<Bar> = c
        .by_day
        .iter()
        .map(|d| {
            Bar::new(d.day as f64, d.credit)
                .width(0.7)
                .name(day_label(d.day))
        })
        .collect();
    let chart = BarChart::new("credit per day", bars).color(GREEN);
    Plot::new("credit-per-day")
        .height(220.0)
        .allow_drag(false)
        .allow_zoom(false)
        .allow_scroll(false)
        .y_axis_label("credit")
        .x_axis_formatter(|mark, _| day_label(mark.value.round() as u64))
        .include_y(0.0)
        .show(ui, |p| p.bar_chart(chart));
}

/// "2026-12-01" for days since the epoch (proleptic Gregorian, UTC).
pub fn day_label(day: u64) -> String {
    // Howard Hinnant's civil_from_days.
    let z = day as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    format!("{}-{m:02}-{d:02}", if m <= 2 { y + 1 } else { y })
}

#[cfg(test)]
mod tests {
    #[test]
    fn day_labels() {
        assert_eq!(super::day_label(0), "1970-01-01");
        assert_eq!(super::day_label(20_788), "2026-12-01");
    }
}
