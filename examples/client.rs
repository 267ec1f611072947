//! The console chat client.
//!
//! ```text
//! cargo run --example client -- [--server ADDR] [NAME [ROOM]]
//! ```
//!
//! Joins ROOM (default `general`) on the server at ADDR (default `127.0.0.1:50051`) as
//! NAME (asked for when missing), prints the room's recent messages, then live ones as
//! `[HH:MM:SS] [alice] hello` (times in UTC) and presence as `* bob joined`. Each input
//! line is a message or a command (`/help` lists them). When standard input is not a
//! terminal, end of input waits until every message was acknowledged by the server,
//! leaves the room and exits with status 0.

use std::io::{self, BufRead, IsTerminal, Write};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use clap::Parser;
use crossbeam_channel::{bounded, select, Receiver};
use grpc_chat::client::{ChatConfig, ChatSession, Client, Error, Event, Message};

/// How long to wait for the server to acknowledge the last messages before leaving.
const ACK_WAIT: Duration = Duration::from_secs(30);

#[derive(Parser, Debug)]
#[command(name = "client", about = "Console client for grpc-chat")]
struct Args {
    /// The server's address (host:port).
    #[arg(long, default_value = "127.0.0.1:50051")]
    server: String,
    /// Your user name (asked for when missing).
    name: Option<String>,
    /// The room to join.
    #[arg(default_value = "general")]
    room: String,
}

const HELP: &str = "\
commands:
  /help          this list
  /list          who is in the room
  /rooms         the rooms on the server
  /join ROOM     leave this room and join ROOM
  /history [N]   the last N messages of the room (default 20)
  /retry         reconnect now instead of waiting
  /quit          leave the room and exit
anything else is sent as a message";

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(sentence) => {
            let _ = writeln!(io::stderr(), "error: {sentence}");
            ExitCode::FAILURE
        }
    }
}

/// Reads standard input on a thread of its own; the channel closes at end of input. A
/// line that is not UTF-8 is refused with a sentence, and the lines after it still count.
/// The channel holds a few lines only: while the session cannot take more messages,
/// input waits in the pipe rather than in memory.
fn stdin_lines() -> Receiver<String> {
    let (tx, rx) = bounded(16);
    thread::spawn(move || {
        let mut input = io::stdin().lock();
        let mut bytes = Vec::new();
        loop {
            bytes.clear();
            match input.read_until(b'\n', &mut bytes) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let line = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            match std::str::from_utf8(line) {
                Ok(line) => {
                    if tx.send(line.to_owned()).is_err() {
                        break;
                    }
                }
                Err(_) => say("that line is not UTF-8 (is the terminal set to UTF-8?); it was not sent"),
            }
        }
    });
    rx
}

/// `[HH:MM:SS] [alice] hello`, with the time of day in UTC.
fn format_message(m: &Message) -> String {
    let secs = m.sent_at_ms.div_euclid(1000).rem_euclid(86_400);
    let (h, min, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    format!("[{h:02}:{min:02}:{s:02}] [{}] {}", m.user, m.text)
}

/// Set when standard output is gone (the reader of a pipe exited, as `client | head`
/// does): the client then leaves the room and exits instead of panicking on the next print.
static OUTPUT_GONE: AtomicBool = AtomicBool::new(false);

/// Prints one line to standard output.
fn out(line: &str) {
    if writeln!(io::stdout().lock(), "{line}").is_err() {
        OUTPUT_GONE.store(true, Ordering::Relaxed);
    }
}

fn say(line: &str) {
    out(&format!("* {line}"));
}

struct App {
    client: Client,
    name: String,
    chat: ChatSession,
    interactive: bool,
}

fn run(args: Args) -> Result<(), String> {
    let interactive = io::stdin().is_terminal();
    let lines = stdin_lines();
    let client = Client::connect(&args.server, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    let mut name = match args.name {
        Some(name) => name,
        None => ask_name(&lines, interactive)?,
    };
    let joined = loop {
        match client.join(&name, &args.room) {
            Ok(joined) => break joined,
            Err(e @ (Error::NameTaken { .. } | Error::BadName(_))) if interactive => {
                say(&e.to_string());
                name = ask_name(&lines, interactive)?;
            }
            Err(e) => return Err(e.to_string()),
        }
    };
    let chat = client.chat(&joined, ChatConfig::default());
    let mut app = App { client, name, chat, interactive };
    app.wait_welcome()?;
    if app.interactive {
        say("type /help for the list of commands");
    }
    loop {
        select! {
            recv(lines) -> line => match line {
                Ok(line) => {
                    if !app.handle_line(&line)? {
                        return app.finish();
                    }
                }
                Err(_) => return app.finish(),
            },
            recv(app.chat.events()) -> event => match event {
                Ok(event) => app.show(event)?,
                Err(_) => return Err("the chat session ended".into()),
            },
        }
        if OUTPUT_GONE.load(Ordering::Relaxed) {
            return app.finish();
        }
    }
}

fn ask_name(lines: &Receiver<String>, interactive: bool) -> Result<String, String> {
    loop {
        if interactive {
            let _ = write!(io::stdout(), "your name: ");
            let _ = io::stdout().flush();
        }
        match lines.recv() {
            Ok(line) if !line.trim().is_empty() => return Ok(line.trim().to_string()),
            Ok(_) => continue,
            Err(_) => return Err("no user name was given".into()),
        }
    }
}

impl App {
    /// Prints events until the session's first welcome, so that input is read once the
    /// room is joined (a piped script then sees a predictable transcript).
    fn wait_welcome(&self) -> Result<(), String> {
        let deadline = crossbeam_channel::after(Duration::from_secs(30));
        loop {
            select! {
                recv(self.chat.events()) -> event => match event {
                    Ok(event) => {
                        let welcome = matches!(event, Event::Welcome { .. });
                        self.show(event)?;
                        if welcome {
                            return Ok(());
                        }
                    }
                    Err(_) => return Err("the chat session ended".into()),
                },
                recv(deadline) -> _ => return Err("the server did not let us into the room in time".into()),
            }
        }
    }

    /// Prints one event; a closed session is an error (we only leave in `finish`).
    fn show(&self, event: Event) -> Result<(), String> {
        match event {
            Event::Welcome { room, user, members, member_count, reconnected } => {
                if reconnected {
                    say("reconnected");
                } else if members.is_empty() {
                    say(&format!("you joined {room} as {user} ({member_count} members)"));
                } else {
                    say(&format!("you joined {room} as {user}; members: {}", members.join(", ")));
                }
            }
            Event::Message(m) => out(&format_message(&m)),
            Event::Presence { user, joined } => {
                say(&format!("{user} {}", if joined { "joined" } else { "left" }));
            }
            Event::Gap => say("some messages were missed"),
            Event::Notice(text) => say(&format!("server: {text}")),
            Event::PostRejected { reason, .. } => say(&format!("your message was not sent: {reason}")),
            Event::Disconnected { reason, retry_in } => say(&format!(
                "{reason}; reconnecting in {:.1}s (type /retry to try now)",
                retry_in.as_secs_f64()
            )),
            Event::Closed(Some(e)) => return Err(e.to_string()),
            Event::Closed(None) => {}
        }
        Ok(())
    }

    /// Handles one input line; returns false when the user asked to quit.
    fn handle_line(&mut self, line: &str) -> Result<bool, String> {
        let trimmed = line.trim();
        if trimmed.is_empty() {
            return Ok(true);
        }
        if !trimmed.starts_with('/') {
            self.post(line)?;
            return Ok(true);
        }
        if !self.interactive {
            // A script's commands see the effect of the messages typed before them.
            self.drain_until_acked(&self.chat)?;
        }
        let mut words = trimmed.split_whitespace();
        let command = words.next().unwrap_or_default();
        let arg = words.next();
        let extra = words.next().is_some();
        match (command, arg, extra) {
            ("/help", None, false) => out(HELP),
            ("/quit", None, false) => return Ok(false),
            ("/list", None, false) => match self.client.list_members(self.chat.room()) {
                Ok(members) if members.is_empty() => say("nobody is in the room"),
                Ok(members) => say(&format!("members of {}: {}", self.chat.room(), members.join(", "))),
                Err(e) => say(&e.to_string()),
            },
            ("/rooms", None, false) => match self.client.list_rooms() {
                Ok(rooms) if rooms.is_empty() => say("there are no rooms"),
                Ok(rooms) => {
                    let list: Vec<String> = rooms
                        .iter()
                        .map(|r| {
                            let s = if r.members == 1 { "" } else { "s" };
                            format!("{} ({} member{s})", r.name, r.members)
                        })
                        .collect();
                    say(&format!("rooms: {}", list.join(", ")));
                }
                Err(e) => say(&e.to_string()),
            },
            ("/join", Some(room), false) => self.switch_room(room)?,
            ("/join", _, _) => say("usage: /join ROOM"),
            ("/history", n, false) => match n.map(str::parse::<u32>).unwrap_or(Ok(20)) {
                Ok(n) if n > 0 => self.history(n),
                _ => say("usage: /history [N], where N is a number of messages above 0"),
            },
            ("/retry", None, false) => {
                if self.chat.state().live {
                    say("already connected");
                } else {
                    say("reconnecting now");
                    self.chat.retry_now();
                }
            }
            ("/help" | "/quit" | "/list" | "/rooms" | "/retry", _, _) => {
                say(&format!("{command} takes no arguments; type /help for the list of commands"));
            }
            _ => say(&format!("unknown command {command}; type /help for the list of commands")),
        }
        Ok(true)
    }

    /// Sends one message. While the session holds as many unacknowledged messages as it
    /// keeps (a long outage, or input piped faster than the server acknowledges), it
    /// shows events until there is room again; input waits meanwhile.
    fn post(&self, line: &str) -> Result<(), String> {
        loop {
            match self.chat.post(line) {
                Ok(_) => return Ok(()),
                Err(Error::OutboxFull(_)) => self.wait_for_room()?,
                Err(e) => {
                    say(&e.to_string());
                    return Ok(());
                }
            }
        }
    }

    fn wait_for_room(&self) -> Result<(), String> {
        let room = self.chat.room_to_post();
        let n = self.chat.state().pending_posts;
        say(&format!("{n} messages are waiting for the server; reading more input when it takes some"));
        loop {
            select! {
                recv(room) -> _ => return Ok(()),
                recv(self.chat.events()) -> event => match event {
                    Ok(event) => self.show(event)?,
                    Err(_) => return Err("the chat session ended".into()),
                },
            }
        }
    }

    fn history(&self, n: u32) {
        match self.client.history(self.chat.room(), 0, n) {
            Ok(messages) if messages.is_empty() => say(&format!("no messages in {} yet", self.chat.room())),
            Ok(messages) => {
                say(&format!("the last {} message(s) of {}:", messages.len(), self.chat.room()));
                for m in &messages {
                    out(&format_message(m));
                }
            }
            Err(e) => say(&e.to_string()),
        }
    }

    /// Joins `room` first (so a refusal leaves us where we are), then leaves the old one.
    fn switch_room(&mut self, room: &str) -> Result<(), String> {
        if room == self.chat.room() {
            say(&format!("you are already in {room}"));
            return Ok(());
        }
        let joined = match self.client.join(&self.name, room) {
            Ok(joined) => joined,
            Err(e) => {
                say(&e.to_string());
                return Ok(());
            }
        };
        let new = self.client.chat(&joined, ChatConfig::default());
        let old = std::mem::replace(&mut self.chat, new);
        self.drain_until_acked(&old)?;
        let from = old.room().to_string();
        match old.leave() {
            Ok(()) => say(&format!("you left {from}")),
            Err(e) => say(&e.to_string()),
        }
        Ok(())
    }

    /// Prints `chat`'s events until all its posts are acknowledged.
    fn drain_until_acked(&self, chat: &ChatSession) -> Result<(), String> {
        let acked = chat.acked();
        let deadline = crossbeam_channel::after(ACK_WAIT);
        loop {
            select! {
                recv(acked) -> done => return match done {
                    Ok(Ok(())) | Err(_) => Ok(()),
                    Ok(Err(e)) => Err(e.to_string()),
                },
                recv(chat.events()) -> event => {
                    if let Ok(event) = event {
                        self.show(event)?;
                    }
                }
                recv(deadline) -> _ => {
                    let n = chat.state().pending_posts;
                    return Err(format!("the server did not acknowledge {n} message(s) in time"));
                }
            }
        }
    }

    /// End of input or /quit: wait for acknowledgements, leave, print what remains.
    fn finish(self) -> Result<(), String> {
        self.drain_until_acked(&self.chat)?;
        let App { chat, .. } = self;
        let events = chat.events().clone();
        let left = chat.leave();
        for event in events.try_iter() {
            if let Event::Closed(_) = event {
                break;
            }
            let _ = print_late(event);
        }
        left.map_err(|e| e.to_string())
    }
}

/// Prints an event that arrived while leaving (messages and presence only).
fn print_late(event: Event) -> Option<()> {
    match event {
        Event::Message(m) => out(&format_message(&m)),
        Event::Presence { user, joined } => {
            say(&format!("{user} {}", if joined { "joined" } else { "left" }))
        }
        _ => {}
    }
    Some(())
}
