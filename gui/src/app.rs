//! The eframe application: feeds the backend's messages and the owner's input to the model, sends
//! the requests it returns, draws the view, and can be driven by a script (tests, `--screenshot`)
//! through real pointer and keyboard events injected into egui's input.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender};
use std::time::Duration;

use eframe::egui::{self, ColorImage};
use gleaner_client::config::HostSize;

use crate::backend::Backend;
use crate::model::{Connection, Model, Msg, View};
use crate::view::{self, Hits};

/// A look at the model and where widgets are, from the UI thread.
pub type Inspect = Box<dyn FnOnce(&Model, &Hits) + Send>;

/// What a script asks the running window to do.
pub enum Drive {
    /// Click the widget drawn under this name (see [`Hits`]) with the pointer.
    Click(String),
    /// Click a text field, select all its text and type this instead.
    Type(String, String),
    /// Capture the window as rendered.
    Screenshot(Sender<Arc<ColorImage>>),
    Inspect(Inspect),
    Close,
}

/// The desktop app.
pub struct GleanerApp {
    model: Model,
    backend: Backend,
    hits: Hits,
    driver: Option<Receiver<Drive>>,
    /// Input events to inject, one batch per frame.
    inject: VecDeque<Vec<egui::Event>>,
    /// A click waiting for its widget to be drawn.
    waiting: Option<Drive>,
    shot: Option<Sender<Arc<ColorImage>>>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl GleanerApp {
    pub fn new(
        ctx: &egui::Context,
        socket: PathBuf,
        view: View,
        driver: Option<Receiver<Drive>>,
    ) -> GleanerApp {
        let wake_ctx = ctx.clone();
        let backend = Backend::start(socket, Arc::new(move || wake_ctx.request_repaint()));
        let mut model = Model::new(HostSize::here());
        model.view = view;
        ctx.set_theme(egui::ThemePreference::Light);
        ctx.global_style_mut(|s| {
            s.spacing.button_padding = egui::vec2(10.0, 5.0);
        });
        GleanerApp {
            model,
            backend,
            hits: Hits::default(),
            driver,
            inject: VecDeque::new(),
            waiting: None,
            shot: None,
        }
    }

    fn dispatch(&mut self, msg: Msg) {
        for (ask, req) in self.model.update(msg, now_ms()) {
            self.backend.send(ask, req);
        }
    }

    /// The pointer events of a click at the centre of `name`, if it was drawn.
    fn click_events(&self, name: &str) -> Option<Vec<Vec<egui::Event>>> {
        let pos = self.hits.0.get(name)?.center();
        let button = |pressed| egui::Event::PointerButton {
            pos,
            button: egui::PointerButton::Primary,
            pressed,
            modifiers: egui::Modifiers::NONE,
        };
        Some(vec![
            vec![egui::Event::PointerMoved(pos)],
            vec![button(true)],
            vec![button(false)],
            vec![],
        ])
    }

    fn drive(&mut self, ctx: &egui::Context) {
        if !self.inject.is_empty() || self.shot.is_some() {
            return;
        }
        let next = match self.waiting.take() {
            Some(d) => Some(d),
            None => self.driver.as_ref().and_then(|r| r.try_recv().ok()),
        };
        match next {
            None => {}
            Some(Drive::Click(name)) => match self.click_events(&name) {
                Some(ev) => self.inject.extend(ev),
                None => self.waiting = Some(Drive::Click(name)),
            },
            Some(Drive::Type(name, text)) => match self.click_events(&name) {
                Some(ev) => {
                    self.inject.extend(ev);
                    self.inject.push_back(vec![egui::Event::Key {
                        key: egui::Key::A,
                        physical_key: None,
                        pressed: true,
                        repeat: false,
                        modifiers: egui::Modifiers::COMMAND,
                    }]);
                    self.inject.push_back(vec![egui::Event::Text(text)]);
                    self.inject.push_back(vec![]);
                }
                None => self.waiting = Some(Drive::Type(name, text)),
            },
            Some(Drive::Screenshot(tx)) => {
                self.shot = Some(tx);
                ctx.send_viewport_cmd(egui::ViewportCommand::Screenshot(egui::UserData::default()));
            }
            Some(Drive::Inspect(f)) => f(&self.model, &self.hits),
            Some(Drive::Close) => ctx.send_viewport_cmd(egui::ViewportCommand::Close),
        }
    }
}

impl eframe::App for GleanerApp {
    fn logic(&mut self, ctx: &egui::Context, _frame: &mut eframe::Frame) {
        while let Ok(msg) = self.backend.messages.try_recv() {
            self.dispatch(msg);
        }
        if let Some(tx) = &self.shot {
            let image = ctx.input(|i| {
                i.raw.events.iter().find_map(|e| match e {
                    egui::Event::Screenshot { image, .. } => Some(image.clone()),
                    _ => None,
                })
            });
            if let Some(image) = image {
                let _ = tx.send(image);
                self.shot = None;
            }
        }
        if self.driver.is_some() {
            self.drive(ctx);
            ctx.request_repaint_after(Duration::from_millis(16));
        } else {
            // Times left and CPU rates change by themselves.
            ctx.request_repaint_after(Duration::from_secs(1));
        }
    }

    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        self.hits.0.clear();
        let msgs = view::draw(ui, &self.model, now_ms(), &mut self.hits);
        for m in msgs {
            self.dispatch(m);
        }
    }

    fn raw_input_hook(&mut self, _ctx: &egui::Context, raw: &mut egui::RawInput) {
        if let Some(batch) = self.inject.pop_front() {
            raw.events.extend(batch);
        }
    }
}

/// The window's options: its size, and the app id the desktop entry matches.
pub fn native_options() -> eframe::NativeOptions {
    eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_title("Gleaner")
            .with_app_id("org.gleaner.Gleaner")
            .with_inner_size([980.0, 720.0])
            .with_min_inner_size([640.0, 480.0]),
        ..Default::default()
    }
}

/// Runs the window until it is closed (on this thread, which must be the main one).
pub fn run(socket: PathBuf, view: View, driver: Option<Receiver<Drive>>) -> eframe::Result {
    eframe::run_native(
        "Gleaner",
        native_options(),
        Box::new(move |cc| {
            Ok(Box::new(GleanerApp::new(
                &cc.egui_ctx,
                socket,
                view,
                driver,
            )))
        }),
    )
}

/// Writes an RGBA PNG of `image`.
pub fn save_png(image: &ColorImage, path: &Path) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut enc = png::Encoder::new(file, image.size[0] as u32, image.size[1] as u32);
    enc.set_color(png::ColorType::Rgba);
    enc.set_depth(png::BitDepth::Eight);
    let bytes: Vec<u8> = image
        .pixels
        .iter()
        .flat_map(|c| c.to_srgba_unmultiplied())
        .collect();
    let mut w = enc.write_header().map_err(std::io::Error::other)?;
    w.write_image_data(&bytes).map_err(std::io::Error::other)?;
    w.finish().map_err(std::io::Error::other)
}

/// A script for `--screenshot`: waits until the view has its data (or the daemon is known to be
/// unreachable), saves a PNG of the window, and closes it. Returns what the window showed in
/// words (the view, or the problem's title), for the log of a bug report or a test.
pub fn screenshot_script(
    driver: Sender<Drive>,
    view: View,
    path: PathBuf,
    timeout: Duration,
) -> std::thread::JoinHandle<Result<String, String>> {
    std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + timeout;
        let shown = loop {
            let (tx, rx) = std::sync::mpsc::channel();
            let asked = driver.send(Drive::Inspect(Box::new(move |m: &Model, _: &Hits| {
                let shown = match &m.connection {
                    Connection::Connecting => None,
                    Connection::Down(p) => Some(p.explain().0.to_owned()),
                    Connection::Up => match view {
                        View::Status => m.status.is_some(),
                        View::Limits => m.form.is_some(),
                        View::Projects => m.status.is_some() && m.trusted.is_some(),
                        View::Credit => m.credit.is_some(),
                    }
                    .then(|| format!("the {} view", view.title())),
                };
                let _ = tx.send(shown);
            })));
            if asked.is_err() {
                return Err("the window closed".into());
            }
            if let Ok(Some(shown)) = rx.recv_timeout(Duration::from_secs(5)) {
                break shown;
            }
            if std::time::Instant::now() > deadline {
                let _ = driver.send(Drive::Close);
                return Err("timed out waiting for the daemon's data".into());
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        // Two status updates, so CPU rates are measured.
        std::thread::sleep(Duration::from_millis(2200));
        let (tx, rx) = std::sync::mpsc::channel();
        driver
            .send(Drive::Screenshot(tx))
            .map_err(|_| "the window closed")?;
        let image = rx
            .recv_timeout(Duration::from_secs(20))
            .map_err(|_| "no screenshot came")?;
        let r = save_png(&image, &path).map_err(|e| format!("{}: {e}", path.display()));
        let _ = driver.send(Drive::Close);
        r.map(|()| shown)
    })
}
