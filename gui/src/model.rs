//! The GUI's state and the messages that change it: `update` is a pure function of the state and a
//! message that returns the requests to send to the daemon. Rendering only reads the model and
//! emits messages, so everything the GUI decides is tested here without a window.

use std::collections::BTreeMap;

use gleaner::policy::Preset;
use gleaner_client::config::HostSize;
use gleaner_client::control::{ControlError, Request};
use serde_json::Value;

use crate::limits::{Field, FormError, LimitsForm, WindowForm};
use crate::projects::{self, Candidate};
use crate::status::{CreditView, Listing, Policy, Status};

/// The views, one tab each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum View {
    Status,
    Limits,
    Projects,
    Credit,
}

impl View {
    pub const ALL: [View; 4] = [View::Status, View::Limits, View::Projects, View::Credit];

    pub fn title(self) -> &'static str {
        match self {
            View::Status => "Status",
            View::Limits => "Limits",
            View::Projects => "Projects",
            View::Credit => "Credit",
        }
    }
}

/// Why the daemon cannot be used, and how to fix it.
#[derive(Debug, Clone, PartialEq)]
pub enum Problem {
    NotRunning { socket: String, cause: String },
    NoPermission { socket: String },
    Other(String),
}

impl Problem {
    pub fn from_error(e: &ControlError) -> Problem {
        match e {
            ControlError::Connect { path, cause } => Problem::NotRunning {
                socket: path.display().to_string(),
                cause: cause.to_string(),
            },
            ControlError::Permission { path } => Problem::NoPermission {
                socket: path.display().to_string(),
            },
            other => Problem::Other(other.to_string()),
        }
    }

    /// A title, an explanation and the commands that fix it.
    pub fn explain(&self) -> (&'static str, String, Vec<&'static str>) {
        match self {
            Problem::NotRunning { socket, cause } => (
                "The Gleaner daemon is not running",
                format!(
                    "Nothing answers at {socket} ({cause}). The daemon does the work; this window only shows it. Start it, and this window connects by itself."
                ),
                vec![
                    "sudo systemctl enable --now gleaner",
                    "systemctl --user enable --now gleaner   (a desktop install)",
                    "gleaner daemon   (in a terminal, to try it)",
                ],
            ),
            Problem::NoPermission { socket } => (
                "You may not control the Gleaner daemon",
                format!(
                    "The daemon runs, but {socket} only lets root and the gleaner group in. Add yourself to the group, then log out and in again."
                ),
                vec!["sudo usermod -aG gleaner $USER", "then log out and back in"],
            ),
            Problem::Other(e) => (
                "The Gleaner daemon did not answer properly",
                e.clone(),
                vec!["gleaner doctor", "journalctl -u gleaner"],
            ),
        }
    }
}

/// The connection to the daemon as the GUI sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum Connection {
    Connecting,
    Up,
    Down(Problem),
}

/// What the owner asked for, to match replies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ask {
    Pause,
    Resume,
    Limits,
    Policy,
    Credit,
    Trust,
    Untrust,
    /// The trust store's listing (publishers and their shares).
    Trusted,
}

/// Messages: from the backend (the daemon's answers) and from the owner (clicks and typing).
#[derive(Debug, Clone)]
pub enum Msg {
    Connected,
    Disconnected(Problem),
    Status(Box<Status>),
    Reply {
        ask: Ask,
        result: Result<Value, String>,
    },
    Show(View),
    Pause {
        minutes: Option<u64>,
    },
    /// Pause for `minutes` more: from now, or from the end of a timed pause already running.
    Snooze {
        minutes: u64,
    },
    Resume,
    /// Pause (or resume) one machine type, by digest; other types keep running.
    PauseType {
        digest: String,
        paused: bool,
    },
    Preset(Preset),
    Edit(Field, String),
    RunOnBattery(bool),
    PresentRuns(bool),
    AddWindow,
    RemoveWindow(usize),
    ApplyLimits,
    RevertLimits,
    TrustKeyText(String),
    ShareText(String),
    FilePathText(String),
    OpenFile,
    TrustKey,
    TrustFile,
    CancelFile,
    Untrust(String),
    RefreshCredit,
}

/// A notice shown under a view after an action (ok or refused, with the daemon's words).
#[derive(Debug, Clone, PartialEq)]
pub struct Notice {
    pub ok: bool,
    pub text: String,
}

/// CPU use of one machine, from two successive status samples.
#[derive(Debug, Clone, Copy, PartialEq)]
struct CpuSample {
    cpu_seconds: f64,
    at_ms: u64,
}

/// The whole GUI state.
#[derive(Debug, Clone)]
pub struct Model {
    pub view: View,
    pub connection: Connection,
    pub status: Option<Status>,
    /// When the status arrived (unix ms), for "time left" and CPU rates.
    pub status_at_ms: u64,
    /// Cores in use per machine id, from the last two samples.
    pub cpu_now: BTreeMap<String, f64>,
    samples: BTreeMap<String, CpuSample>,
    pub policy: Option<Policy>,
    pub form: Option<LimitsForm>,
    /// The form's validation, redone on every edit.
    pub form_check: Result<String, FormError>,
    /// The daemon's refusal of the last apply, shown inline.
    pub limits_notice: Option<Notice>,
    pub credit: Option<CreditView>,
    /// The trusted publishers with their shares (from `Trusted`).
    pub trusted: Option<Listing>,
    pub trust_key: String,
    pub share: String,
    pub file_path: String,
    pub candidate: Option<Candidate>,
    pub projects_notice: Option<Notice>,
    pub status_notice: Option<Notice>,
    /// Requests in flight (buttons show it).
    pub busy: Vec<Ask>,
    pub host: HostSize,
}

impl Model {
    pub fn new(host: HostSize) -> Model {
        Model {
            view: View::Status,
            connection: Connection::Connecting,
            status: None,
            status_at_ms: 0,
            cpu_now: BTreeMap::new(),
            samples: BTreeMap::new(),
            policy: None,
            form: None,
            form_check: Ok(String::new()),
            limits_notice: None,
            credit: None,
            trusted: None,
            trust_key: String::new(),
            share: "1".into(),
            file_path: String::new(),
            candidate: None,
            projects_notice: None,
            status_notice: None,
            busy: Vec::new(),
            host,
        }
    }

    fn ask(&mut self, ask: Ask, req: Request, out: &mut Vec<(Ask, Request)>) {
        if !self.busy.contains(&ask) {
            self.busy.push(ask);
        }
        out.push((ask, req));
    }

    fn edit_form(&mut self, f: impl FnOnce(&mut LimitsForm)) {
        if let Some(form) = &mut self.form {
            f(form);
            self.form_check = form.validate();
            self.limits_notice = None;
        }
    }

    /// Applies `msg` at `now_ms`; returns the requests to send.
    pub fn update(&mut self, msg: Msg, now_ms: u64) -> Vec<(Ask, Request)> {
        let mut out = Vec::new();
        match msg {
            Msg::Connected => {
                self.connection = Connection::Up;
                self.ask(Ask::Policy, Request::Limits { set: None }, &mut out);
                self.ask(Ask::Credit, Request::Credit, &mut out);
                self.ask(Ask::Trusted, Request::Trusted, &mut out);
            }
            Msg::Disconnected(p) => {
                self.connection = Connection::Down(p);
                self.busy.clear();
            }
            Msg::Status(s) => {
                self.connection = Connection::Up;
                for m in &s.factory.machines {
                    let now = CpuSample {
                        cpu_seconds: m.cpu_seconds,
                        at_ms: now_ms,
                    };
                    if let Some(prev) = self.samples.get(&m.machine_id)
                        && now.at_ms > prev.at_ms
                    {
                        let rate = (now.cpu_seconds - prev.cpu_seconds).max(0.0)
                            / ((now.at_ms - prev.at_ms) as f64 / 1000.0);
                        self.cpu_now.insert(m.machine_id.clone(), rate);
                    }
                    self.samples.insert(m.machine_id.clone(), now);
                }
                let live: Vec<&String> = s.factory.machines.iter().map(|m| &m.machine_id).collect();
                self.samples.retain(|k, _| live.contains(&k));
                self.cpu_now.retain(|k, _| live.contains(&k));
                self.status = Some(*s);
                self.status_at_ms = now_ms;
            }
            Msg::Reply { ask, result } => {
                self.busy.retain(|a| *a != ask);
                self.reply(ask, result, &mut out);
            }
            Msg::Show(v) => {
                self.view = v;
                if v == View::Credit && self.connection == Connection::Up {
                    self.ask(Ask::Credit, Request::Credit, &mut out);
                }
                if v == View::Projects && self.connection == Connection::Up {
                    self.ask(Ask::Trusted, Request::Trusted, &mut out);
                }
            }
            Msg::Pause { minutes } => self.ask(
                Ask::Pause,
                Request::Pause {
                    minutes,
                    machine_type: None,
                },
                &mut out,
            ),
            Msg::Snooze { minutes } => {
                let now = now_ms / 1000;
                let left = match &self.status {
                    Some(s) if s.paused => s.paused_until.map_or(0, |u| u.saturating_sub(now) / 60),
                    _ => 0,
                };
                self.ask(
                    Ask::Pause,
                    Request::Pause {
                        minutes: Some(left + minutes),
                        machine_type: None,
                    },
                    &mut out,
                );
            }
            Msg::Resume => self.ask(
                Ask::Resume,
                Request::Resume { machine_type: None },
                &mut out,
            ),
            Msg::PauseType {
                digest,
                paused: true,
            } => self.ask(
                Ask::Pause,
                Request::Pause {
                    minutes: None,
                    machine_type: Some(digest),
                },
                &mut out,
            ),
            Msg::PauseType {
                digest,
                paused: false,
            } => self.ask(
                Ask::Resume,
                Request::Resume {
                    machine_type: Some(digest),
                },
                &mut out,
            ),
            Msg::Preset(p) => {
                let host = self.host;
                self.form = Some(LimitsForm::from_preset(p, host));
                self.edit_form(|_| {});
            }
            Msg::Edit(field, text) => self.edit_form(|f| f.set(field, text)),
            Msg::RunOnBattery(b) => self.edit_form(|f| f.run_on_battery = b),
            Msg::PresentRuns(b) => self.edit_form(|f| f.present_runs = b),
            Msg::AddWindow => self.edit_form(|f| {
                f.schedule.push(WindowForm {
                    days: "mon-fri".into(),
                    from: "19:00".into(),
                    to: "07:00".into(),
                })
            }),
            Msg::RemoveWindow(i) => self.edit_form(|f| {
                if i < f.schedule.len() {
                    f.schedule.remove(i);
                }
            }),
            Msg::ApplyLimits => {
                if let (Some(form), Ok(_)) = (&self.form, &self.form_check) {
                    let set = form.to_set();
                    self.ask(Ask::Limits, Request::Limits { set: Some(set) }, &mut out);
                }
            }
            Msg::RevertLimits => {
                if let Some(p) = &self.policy {
                    self.form = Some(LimitsForm::from_policy(p, self.host));
                    self.edit_form(|_| {});
                }
            }
            Msg::TrustKeyText(t) => {
                self.trust_key = t;
                self.projects_notice = None;
            }
            Msg::ShareText(t) => self.share = t,
            Msg::FilePathText(t) => self.file_path = t,
            Msg::OpenFile => {
                match projects::open_file(
                    std::path::Path::new(self.file_path.trim()),
                    now_ms / 1000,
                ) {
                    Ok(c) => {
                        self.candidate = Some(c);
                        self.projects_notice = None;
                    }
                    Err(e) => {
                        self.candidate = None;
                        self.projects_notice = Some(Notice { ok: false, text: e });
                    }
                }
            }
            Msg::CancelFile => self.candidate = None,
            Msg::TrustKey => {
                match (
                    projects::parse_key(&self.trust_key),
                    projects::parse_share(&self.share),
                ) {
                    (Ok(k), Ok(share)) => self.ask(
                        Ask::Trust,
                        Request::Trust {
                            publisher: Some(k),
                            machine_type_hex: None,
                            share: Some(share),
                            allow_vms: None,
                            allow_egress: None,
                            max_cores: None,
                        },
                        &mut out,
                    ),
                    (Err(e), _) | (_, Err(e)) => {
                        self.projects_notice = Some(Notice { ok: false, text: e })
                    }
                }
            }
            Msg::TrustFile => match (&self.candidate, projects::parse_share(&self.share)) {
                (Some(c), Ok(share)) => {
                    let req = Request::Trust {
                        publisher: Some(c.publisher.clone()),
                        machine_type_hex: Some(c.file_hex.clone()),
                        share: Some(share),
                        allow_vms: None,
                        allow_egress: None,
                        max_cores: None,
                    };
                    self.ask(Ask::Trust, req, &mut out);
                }
                (None, _) => {}
                (_, Err(e)) => self.projects_notice = Some(Notice { ok: false, text: e }),
            },
            Msg::Untrust(p) => self.ask(Ask::Untrust, Request::Untrust { publisher: p }, &mut out),
            Msg::RefreshCredit => self.ask(Ask::Credit, Request::Credit, &mut out),
        }
        out
    }

    fn reply(&mut self, ask: Ask, result: Result<Value, String>, out: &mut Vec<(Ask, Request)>) {
        match (ask, result) {
            (Ask::Policy, Ok(v)) => {
                if let Ok(p) = serde_json::from_value::<Policy>(v) {
                    // An edit in progress is kept; a fresh form follows the policy in force.
                    if self.form.is_none()
                        || self.form
                            == self
                                .policy
                                .as_ref()
                                .map(|old| LimitsForm::from_policy(old, self.host))
                    {
                        self.form = Some(LimitsForm::from_policy(&p, self.host));
                        self.form_check = self
                            .form
                            .as_ref()
                            .map_or(Ok(String::new()), LimitsForm::validate);
                    }
                    self.policy = Some(p);
                }
            }
            (Ask::Credit, Ok(v)) => {
                if let Ok(c) = serde_json::from_value::<CreditView>(v) {
                    self.credit = Some(c);
                }
            }
            (Ask::Limits, Ok(v)) => {
                if let Some(p) = v
                    .get("policy")
                    .cloned()
                    .and_then(|p| serde_json::from_value::<Policy>(p).ok())
                {
                    self.policy = Some(p);
                }
                self.limits_notice = Some(Notice {
                    ok: true,
                    text: "Applied: the daemon uses these limits now.".into(),
                });
            }
            (Ask::Limits, Err(e)) => {
                self.limits_notice = Some(Notice {
                    ok: false,
                    text: format!("The daemon refused these limits: {e}"),
                })
            }
            (Ask::Trust, Ok(_)) => {
                self.candidate = None;
                self.trust_key.clear();
                self.projects_notice = Some(Notice {
                    ok: true,
                    text: "Trusted: its machine types may run here now.".into(),
                });
                self.ask(Ask::Trusted, Request::Trusted, out);
            }
            (Ask::Untrust, Ok(_)) => {
                self.projects_notice = Some(Notice {
                    ok: true,
                    text: "No longer trusted: its machines stop.".into(),
                });
                self.ask(Ask::Trusted, Request::Trusted, out);
            }
            (Ask::Trusted, Ok(v)) => {
                if let Ok(t) = serde_json::from_value::<Listing>(v) {
                    self.trusted = Some(t);
                }
            }
            (Ask::Trust | Ask::Untrust, Err(e)) => {
                self.projects_notice = Some(Notice {
                    ok: false,
                    text: format!("The daemon refused: {e}"),
                })
            }
            (Ask::Pause | Ask::Resume, Ok(_)) => self.status_notice = None,
            (Ask::Pause | Ask::Resume, Err(e)) => {
                self.status_notice = Some(Notice { ok: false, text: e })
            }
            (Ask::Policy | Ask::Credit | Ask::Trusted, Err(e)) => {
                self.status_notice = Some(Notice { ok: false, text: e })
            }
        }
    }

    /// Trusted publishers with their shares (from the trust store's listing, so a publisher with
    /// no machine type here yet is listed too) and their machine types (from the daemon's offers).
    pub fn projects(&self) -> Vec<ProjectRow> {
        let mut rows: BTreeMap<String, ProjectRow> = BTreeMap::new();
        for l in self.trusted.iter().flat_map(|t| &t.trusted) {
            rows.insert(
                l.id.clone(),
                ProjectRow {
                    publisher: l.id.clone(),
                    share: l.share,
                    allows: allows(l),
                    source: l.source.clone(),
                    types: Vec::new(),
                    running: 0,
                    backed_off: false,
                },
            );
        }
        for o in self.status.iter().flat_map(|s| &s.factory.offers) {
            let r = rows
                .entry(o.publisher.clone())
                .or_insert_with(|| ProjectRow {
                    publisher: o.publisher.clone(),
                    share: o.share,
                    allows: String::new(),
                    source: String::new(),
                    types: Vec::new(),
                    running: 0,
                    backed_off: false,
                });
            r.types.push(format!("{} v{}", o.name, o.version));
            r.running += o.running;
            r.backed_off |= o
                .backed_off_until
                .is_some_and(|t| t * 1000 > self.status_at_ms);
        }
        rows.into_values().collect()
    }

    /// A machine type's name from its digest, when the daemon offers it.
    pub fn type_name(&self, digest: &str) -> Option<String> {
        self.status
            .iter()
            .flat_map(|s| &s.factory.offers)
            .find(|o| o.machine_type == digest)
            .map(|o| o.name.clone())
    }
}

/// What a trusted publisher's machine types may have beyond a plain container, in words.
fn allows(l: &crate::status::Listed) -> String {
    let mut a = Vec::new();
    if l.allow_vms {
        a.push("VMs".to_owned());
    }
    if l.allow_egress {
        a.push("network".to_owned());
    }
    if let Some(c) = l.max_cores {
        a.push(format!("at most {c} cores"));
    }
    if a.is_empty() {
        "containers, no network".into()
    } else {
        a.join(", ")
    }
}

/// One trusted project in the Projects view.
#[derive(Debug, Clone, PartialEq)]
pub struct ProjectRow {
    pub publisher: String,
    pub share: f64,
    /// What its machine types may use (VMs, network, a cores cap), in words.
    pub allows: String,
    /// `owner` or `settings` (who trusted it), when the listing says.
    pub source: String,
    pub types: Vec<String>,
    pub running: usize,
    pub backed_off: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::MachineStatus;

    const HOST: HostSize = HostSize {
        cores: 4.0,
        memory_bytes: 8 << 30,
    };

    fn connected() -> Model {
        let mut m = Model::new(HOST);
        let sent = m.update(Msg::Connected, 0);
        assert_eq!(sent.len(), 3, "policy, credit and trust asked for at once");
        let policy = serde_json::json!({
            "away": {"cores": 4.0, "memory_bytes": 4u64 << 30}, "present": null,
            "idle_after_s": 300, "run_on_battery": false, "suspend_above_load": 3.0,
            "schedule": [], "max_machines": 4, "exclusive_apps": [], "stop_after_frozen_s": 14400
        });
        m.update(
            Msg::Reply {
                ask: Ask::Policy,
                result: Ok(policy),
            },
            0,
        );
        m
    }

    #[test]
    fn pause_for_an_hour_and_resume_send_the_requests() {
        let mut m = connected();
        let sent = m.update(Msg::Pause { minutes: Some(60) }, 0);
        assert_eq!(
            sent,
            vec![(
                Ask::Pause,
                Request::Pause {
                    minutes: Some(60),
                    machine_type: None
                }
            )]
        );
        assert!(m.busy.contains(&Ask::Pause));
        m.update(
            Msg::Reply {
                ask: Ask::Pause,
                result: Ok(Value::Null),
            },
            0,
        );
        assert!(!m.busy.contains(&Ask::Pause));
        let sent = m.update(Msg::Resume, 0);
        assert_eq!(sent[0].1, Request::Resume { machine_type: None });
    }

    #[test]
    fn one_machine_type_pauses_and_resumes_by_digest() {
        let mut m = connected();
        let sent = m.update(
            Msg::PauseType {
                digest: "ab12".into(),
                paused: true,
            },
            0,
        );
        assert_eq!(
            sent,
            vec![(
                Ask::Pause,
                Request::Pause {
                    minutes: None,
                    machine_type: Some("ab12".into())
                }
            )]
        );
        let sent = m.update(
            Msg::PauseType {
                digest: "ab12".into(),
                paused: false,
            },
            0,
        );
        assert_eq!(
            sent[0],
            (
                Ask::Resume,
                Request::Resume {
                    machine_type: Some("ab12".into())
                }
            )
        );
    }

    #[test]
    fn snooze_extends_a_running_pause() {
        let mut m = connected();
        let sent = m.update(Msg::Snooze { minutes: 15 }, 0);
        assert_eq!(
            sent[0].1,
            Request::Pause {
                minutes: Some(15),
                machine_type: None
            }
        );
        let s = Status {
            paused: true,
            paused_until: Some(1_000 + 30 * 60),
            ..Status::default()
        };
        m.update(Msg::Status(Box::new(s)), 1_000_000);
        let sent = m.update(Msg::Snooze { minutes: 60 }, 1_000_000);
        assert_eq!(
            sent[0].1,
            Request::Pause {
                minutes: Some(90),
                machine_type: None
            }
        );
    }

    #[test]
    fn invalid_limits_are_not_sent_and_valid_ones_are() {
        let mut m = connected();
        assert!(m.form_check.is_ok(), "{:?}", m.form_check);
        m.update(Msg::Edit(Field::Memory, "lots".into()), 0);
        let e = m.form_check.clone().unwrap_err();
        assert_eq!(e.field, Some(Field::Memory));
        assert!(
            m.update(Msg::ApplyLimits, 0).is_empty(),
            "refused in the form"
        );
        m.update(Msg::Edit(Field::Memory, "2GiB".into()), 0);
        let sent = m.update(Msg::ApplyLimits, 0);
        match &sent[0].1 {
            Request::Limits { set: Some(s) } => assert_eq!(s["memory"], "2GiB"),
            other => panic!("{other:?}"),
        }
        m.update(
            Msg::Reply {
                ask: Ask::Limits,
                result: Err("limits refused, nothing changed: x".into()),
            },
            0,
        );
        assert!(!m.limits_notice.as_ref().unwrap().ok);
    }

    #[test]
    fn cpu_now_comes_from_two_samples() {
        let mut m = connected();
        let mut s = Status::default();
        s.factory.machines.push(MachineStatus {
            machine_id: "m1".into(),
            cpu_seconds: 10.0,
            ..MachineStatus::default()
        });
        m.update(Msg::Status(Box::new(s.clone())), 1_000);
        s.factory.machines[0].cpu_seconds = 10.5;
        m.update(Msg::Status(Box::new(s.clone())), 2_000);
        assert!((m.cpu_now["m1"] - 0.5).abs() < 1e-9);
        s.factory.machines.clear();
        m.update(Msg::Status(Box::new(s)), 3_000);
        assert!(m.cpu_now.is_empty(), "gone machines are forgotten");
    }

    #[test]
    fn trust_by_key_validates_first() {
        let mut m = connected();
        m.update(Msg::TrustKeyText("nonsense".into()), 0);
        assert!(m.update(Msg::TrustKey, 0).is_empty());
        assert!(!m.projects_notice.as_ref().unwrap().ok);
        let key = gleaner::SecretKey::from_seed([9; 32]).public().to_string();
        m.update(Msg::TrustKeyText(key.clone()), 0);
        m.update(Msg::ShareText("2".into()), 0);
        let sent = m.update(Msg::TrustKey, 0);
        assert_eq!(
            sent[0].1,
            Request::Trust {
                publisher: Some(key),
                machine_type_hex: None,
                share: Some(2.0),
                allow_vms: None,
                allow_egress: None,
                max_cores: None,
            }
        );
    }

    #[test]
    fn projects_list_trusted_publishers_with_their_shares_even_without_types() {
        let mut m = connected();
        let listing = serde_json::json!({"file": "/x/trust.toml", "trusted": [
            {"id": "pubA", "share": 2.0, "allow_vms": true, "allow_egress": false,
             "max_cores": null, "source": "owner", "rotated_from": []},
            {"id": "pubB", "share": 0.5, "allow_vms": false, "allow_egress": false,
             "max_cores": 2, "source": "settings", "rotated_from": []}],
            "removed": [], "revoked": [], "rotations": []});
        m.update(
            Msg::Reply {
                ask: Ask::Trusted,
                result: Ok(listing),
            },
            0,
        );
        let mut s = Status::default();
        s.factory.offers.push(crate::status::OfferStatus {
            publisher: "pubB".into(),
            name: "sim".into(),
            version: 2,
            share: 0.5,
            running: 1,
            ..Default::default()
        });
        m.update(Msg::Status(Box::new(s)), 0);
        let rows = m.projects();
        assert_eq!(rows.len(), 2);
        assert_eq!((rows[0].publisher.as_str(), rows[0].share), ("pubA", 2.0));
        assert!(rows[0].types.is_empty() && rows[0].allows.contains("VMs"));
        assert_eq!(rows[1].types, vec!["sim v2".to_owned()]);
        assert_eq!(rows[1].running, 1);
        assert!(rows[1].allows.contains("at most 2 cores"));
        // A trust change asks the listing again.
        let sent = m.update(
            Msg::Reply {
                ask: Ask::Trust,
                result: Ok(Value::Null),
            },
            0,
        );
        assert_eq!(sent, vec![(Ask::Trusted, Request::Trusted)]);
    }

    #[test]
    fn problems_say_how_to_fix_them() {
        let e = ControlError::Permission {
            path: "/run/gleaner/control.sock".into(),
        };
        let (title, _, fix) = Problem::from_error(&e).explain();
        assert!(title.contains("may not"));
        assert!(fix[0].contains("usermod -aG gleaner"));
        let e = ControlError::Connect {
            path: "/x.sock".into(),
            cause: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        let (title, why, _) = Problem::from_error(&e).explain();
        assert!(title.contains("not running") && why.contains("/x.sock"));
    }
}
