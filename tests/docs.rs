//! README.md and docs/ are true: every link between them leads to a file and a heading that
//! exist, every file of the repository they name exists, and every command in their `sh` blocks names a real program, subcommand, option, file,
//! make target, test and bench. The commands that can run on a test machine run: `discus
//! validate`, `helm install` (rendered with `helm template`, the same arguments), `make -n`.
//! Those that need a cluster or a node (kubectl, `discus serve`) are checked against the real
//! program's `--help`; tests/node.rs and tests/serve_tgt.rs run them for real.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail by panicking

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use support::{control_plane, discus, repo};

/// The user documentation: README.md and every page under docs/.
fn pages() -> Vec<PathBuf> {
    let mut pages = vec![repo().join("README.md")];
    pages.extend(
        support::files_in("docs")
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "md")),
    );
    pages
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn name(path: &Path) -> String {
    path.strip_prefix(repo())
        .unwrap_or(path)
        .display()
        .to_string()
}

/// The lines outside fenced blocks, and the fenced blocks with their info string.
struct Markdown {
    prose: Vec<String>,
    blocks: Vec<(String, Vec<String>)>,
}

fn parse(text: &str) -> Markdown {
    let mut markdown = Markdown {
        prose: Vec::new(),
        blocks: Vec::new(),
    };
    let mut block: Option<(String, Vec<String>)> = None;
    for line in text.lines() {
        match (&mut block, line.strip_prefix("```")) {
            (None, Some(info)) => block = Some((info.trim().to_owned(), Vec::new())),
            (Some(_), Some(_)) => markdown.blocks.extend(block.take()),
            (Some((_, lines)), None) => lines.push(line.to_owned()),
            (None, None) => markdown.prose.push(line.to_owned()),
        }
    }
    assert!(block.is_none(), "a fenced block is never closed");
    markdown
}

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces as dashes.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == '-' || *c == ' ' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

fn anchors(markdown: &Markdown) -> BTreeSet<String> {
    markdown
        .prose
        .iter()
        .filter_map(|line| {
            line.trim_start_matches('#')
                .strip_prefix(' ')
                .filter(|_| line.starts_with('#'))
        })
        .map(anchor)
        .collect()
}

/// Every `](target)` of a page's prose.
fn links(markdown: &Markdown) -> Vec<String> {
    let mut links = Vec::new();
    for line in &markdown.prose {
        let mut rest = line.as_str();
        while let Some(start) = rest.find("](") {
            rest = &rest[start + 2..];
            if let Some(end) = rest.find(')') {
                links.push(rest[..end].to_owned());
                rest = &rest[end..];
            }
        }
    }
    links
}

#[test]
fn every_link_leads_to_a_page_and_a_heading_that_exist() {
    let mut broken = Vec::new();
    for page in pages() {
        let markdown = parse(&read(&page));
        for link in links(&markdown) {
            if link.starts_with("https://") || link.starts_with("http://") {
                continue;
            }
            let (file, fragment) = link.split_once('#').unwrap_or((&link, ""));
            let target = if file.is_empty() {
                page.clone()
            } else {
                page.parent().expect("folder").join(file)
            };
            if !target.exists() {
                broken.push(format!("{}: {link}: no such file", name(&page)));
                continue;
            }
            if !fragment.is_empty() && !anchors(&parse(&read(&target))).contains(fragment) {
                broken.push(format!(
                    "{}: {link}: no such heading in {}",
                    name(&page),
                    name(&target)
                ));
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

/// One command of a `sh` block: its words (a `\` continues a line; `#` starts a comment;
/// `<placeholder>`s become a value a user might put there).
#[derive(Debug)]
struct Shell {
    page: String,
    words: Vec<String>,
}

impl Shell {
    fn program(&self) -> &str {
        &self.words[0]
    }

    fn options(&self) -> impl Iterator<Item = &str> {
        self.words
            .iter()
            .take_while(|w| *w != "--")
            .filter(|w| w.starts_with('-') && *w != "-")
            .map(|w| w.split_once('=').map_or(w.as_str(), |(flag, _)| flag))
    }

    /// The words before the first option: the program's subcommands. A leading `-n NAMESPACE`
    /// (kubectl's way) is passed over.
    fn subcommands(&self) -> Vec<&str> {
        let skip = if self.words.get(1).is_some_and(|w| w == "-n") {
            3
        } else {
            1
        };
        self.words
            .iter()
            .skip(skip)
            .take_while(|w| !w.starts_with('-'))
            .map(String::as_str)
            .collect()
    }

    fn files_after(&self, flag: &str) -> Vec<&str> {
        self.words
            .windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }
}

fn commands() -> Vec<Shell> {
    let mut commands = Vec::new();
    for page in pages() {
        for (info, lines) in parse(&read(&page)).blocks {
            if info != "sh" {
                continue;
            }
            let joined = lines.join("\n").replace("\\\n", " ");
            for line in joined.lines() {
                let line = line.split(" #").next().unwrap_or_default();
                if line.trim().is_empty() || line.trim_start().starts_with('#') {
                    continue;
                }
                for part in line.split(" | ") {
                    let filled = fill_placeholders(part);
                    let mut words = shlex::split(&filled)
                        .unwrap_or_else(|| panic!("{}: cannot split `{part}`", name(&page)));
                    // `NAME=value command …`: the environment of the command, not the command.
                    let program = words.iter().position(|w| !is_assignment(w)).unwrap_or(0);
                    words.drain(..program);
                    commands.push(Shell {
                        page: name(&page),
                        words,
                    });
                }
            }
        }
    }
    commands
}

/// `NAME=value`, as a shell reads it before a command.
fn is_assignment(word: &str) -> bool {
    word.split_once('=').is_some_and(|(name, _)| {
        !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
    })
}

/// `<your-registry>` → `registry.example`, and the like: what a reader types there.
fn fill_placeholders(line: &str) -> String {
    let mut out = String::new();
    let mut rest = line;
    while let Some(start) = rest.find('<') {
        out.push_str(&rest[..start]);
        let Some(end) = rest[start..].find('>') else {
            break;
        };
        let placeholder = &rest[start + 1..start + end];
        out.push_str(match placeholder {
            p if p.contains("registry") => "registry.example",
            p if p.contains("sha256") => {
                "0000000000000000000000000000000000000000000000000000000000000000"
            }
            p if p.contains("image") => "registry.example/discus:0.1.0",
            _ => "example",
        });
        rest = &rest[start + end + 1..];
    }
    out.push_str(rest);
    out
}

fn help(command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Every option the command gives is one its help lists (`<program> <subcommands> --help`, and
/// the global options' help where the program has one).
fn options_are_known(shell: &Shell, helps: &mut [Command]) -> Vec<String> {
    let text: String = helps.iter_mut().map(help).collect();
    let listed = |option: &str| {
        text.split(|c: char| c.is_whitespace() || c == ',' || c == '=' || c == '[')
            .any(|word| word == option)
    };
    shell
        .options()
        .filter(|option| !listed(option))
        .map(|option| {
            format!(
                "{}: `{}`: {option} is not an option",
                shell.page,
                shell.words.join(" ")
            )
        })
        .collect()
}

fn check_discus(shell: &Shell) -> Vec<String> {
    let mut help_command = discus();
    help_command.args(shell.subcommands()).arg("--help");
    let mut problems = options_are_known(shell, &mut [help_command]);
    for file in shell.files_after("-f") {
        if !repo().join(file).exists() {
            problems.push(format!("{}: {file}: no such file", shell.page));
        }
    }
    if shell.subcommands() == ["validate"] {
        let output = discus()
            .args(&shell.words[1..])
            .current_dir(repo())
            .output()
            .expect("discus runs");
        if !output.status.success() {
            problems.push(format!(
                "{}: `{}` fails: {}",
                shell.page,
                shell.words.join(" "),
                String::from_utf8_lossy(&output.stdout)
            ));
        }
    }
    problems
}

fn check_kubectl(shell: &Shell) -> Vec<String> {
    let kubectl = || Command::new(control_plane::bin_dir().join("kubectl"));
    let mut verb = kubectl();
    verb.args(shell.subcommands().iter().take(1)).arg("--help");
    let mut global = kubectl();
    global.arg("options");
    let mut problems = options_are_known(shell, &mut [verb, global]);
    // `-f -` reads what a command before it in a pipe prints.
    for file in shell.files_after("-f") {
        if file != "-" && !repo().join(file).exists() {
            problems.push(format!("{}: {file}: no such file", shell.page));
        }
    }
    problems
}

/// `helm install NAME CHART ARGS…` renders with `helm template NAME CHART ARGS…`.
fn check_helm(shell: &Shell) -> Vec<String> {
    if shell.subcommands().first() != Some(&"install") {
        return vec![format!(
            "{}: `{}`: only helm install is checked",
            shell.page,
            shell.words.join(" ")
        )];
    }
    let output = support::chart::helm()
        .arg("template")
        .args(&shell.words[2..])
        .current_dir(repo())
        .output()
        .expect("helm runs");
    if output.status.success() {
        return Vec::new();
    }
    vec![format!(
        "{}: `{}` does not render: {}",
        shell.page,
        shell.words.join(" "),
        String::from_utf8_lossy(&output.stderr)
    )]
}

fn check_make(shell: &Shell) -> Vec<String> {
    let output = Command::new("make")
        .arg("-n")
        .args(&shell.words[1..])
        .current_dir(repo())
        .output()
        .expect("make runs");
    if output.status.success() {
        return Vec::new();
    }
    vec![format!(
        "{}: `{}`: {}",
        shell.page,
        shell.words.join(" "),
        String::from_utf8_lossy(&output.stderr)
    )]
}

/// `cargo test --test FILE -- NAME` and `cargo bench --bench FILE` name what exists.
fn check_cargo(shell: &Shell) -> Vec<String> {
    let mut problems = Vec::new();
    for (flag, folder) in [("--test", "tests"), ("--bench", "benches")] {
        for target in shell.files_after(flag) {
            let file = repo().join(folder).join(format!("{target}.rs"));
            if !file.exists() {
                problems.push(format!("{}: {}: no such file", shell.page, name(&file)));
                continue;
            }
            if let Some(filter) = (shell.words.iter().skip_while(|w| *w != "--").skip(1))
                .find(|w| !w.starts_with('-'))
                && !read(&file).contains(&format!("fn {filter}"))
            {
                problems.push(format!(
                    "{}: no test in {} starts with {filter}",
                    shell.page,
                    name(&file)
                ));
            }
        }
    }
    problems
}

/// A program of the repository (`.ci/run`, `tools/…`): there and executable.
fn check_script(shell: &Shell) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    let path = repo().join(shell.program());
    match std::fs::metadata(&path) {
        Ok(meta) if meta.permissions().mode() & 0o111 != 0 => Vec::new(),
        _ => vec![format!(
            "{}: {}: not an executable of the repository",
            shell.page,
            shell.program()
        )],
    }
}

#[test]
fn every_command_in_the_docs_names_what_exists_and_runs_where_it_can() {
    let commands = commands();
    assert!(commands.len() > 20, "too few commands found: {commands:?}");
    let mut problems = Vec::new();
    for shell in &commands {
        problems.extend(match shell.program() {
            "discus" => check_discus(shell),
            "kubectl" => check_kubectl(shell),
            "helm" => check_helm(shell),
            "make" => check_make(shell),
            "cargo" => check_cargo(shell),
            "export" => Vec::new(),
            // What the image tests build (tests/image.rs) and a filter of kubectl's output.
            "docker" if shell.words == ["docker", "build", "-t", "discus", "."] => Vec::new(),
            "grep" => Vec::new(),
            // The load of docs/reliability.md's loaded run (Debian's stress-ng, not installed by CI).
            "stress-ng" if shell.words == ["stress-ng", "--cpu", "2", "--timeout", "60m", "&"] => {
                Vec::new()
            }
            // Room for tgtd's threads and their stacks (docs/performance.md, the agent and
            // change benchmarks).
            "sysctl"
                if shell.words == ["sysctl", "-w", "kernel.pid_max=4194304"]
                    || shell.words
                        == [
                            "sysctl",
                            "-w",
                            "kernel.pid_max=4194304",
                            "vm.max_map_count=1048576",
                        ] =>
            {
                Vec::new()
            }
            program if program.starts_with(".ci/") || program.starts_with("tools/") => {
                check_script(shell)
            }
            other => vec![format!(
                "{}: `{other}`: a program this test does not know; check it here",
                shell.page
            )],
        });
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn every_file_of_the_repository_the_docs_name_exists() {
    let folders = [
        "src/",
        "tests/",
        "tools/",
        "deploy/",
        "charts/",
        "examples/",
        "benches/",
        "crds/",
        "docs/",
    ];
    let mut missing = Vec::new();
    for page in pages() {
        for (number, line) in read(&page).lines().enumerate() {
            for quoted in line.split('`').skip(1).step_by(2) {
                let path = quoted
                    .split([':', '#', '(', ' '])
                    .next()
                    .unwrap_or_default();
                if folders.iter().any(|f| path.starts_with(f))
                    && !path.contains('<')
                    && !repo().join(path).exists()
                {
                    missing.push(format!("{}:{}: {path}", name(&page), number + 1));
                }
            }
        }
    }
    assert!(
        missing.is_empty(),
        "files the docs name that do not exist:\n{}",
        missing.join("\n")
    );
}
