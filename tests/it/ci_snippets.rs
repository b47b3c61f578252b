//! The CI files in `deploy/` run as their CI systems would run them: the GitHub
//! Actions composite action's steps and the GitLab CI template's scripts, read
//! from the YAML, executed by bash with the variables those systems set, the real
//! gateway binary on `PATH`, and the real `moon` resolving through the
//! `HTTPS_PROXY` the snippets export (inside a loopback-only network namespace:
//! moon asks for mooncakes.io). The job report they write must count the job's
//! archives.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use yaml_rust2::{Yaml, YamlLoader};

use crate::upstream::gateway::free_local_addr;
use crate::upstream::scenario::{inside_loopback_namespace, moon_bin, ok, run};
use crate::upstream::{Registry, Upstream};

/// The deploy file `name`, parsed.
fn deploy_yaml(name: &str) -> Yaml {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    YamlLoader::load_from_str(&text)
        .unwrap_or_else(|e| panic!("{path:?} is not YAML: {e}"))
        .remove(0)
}

/// A test registry with a three-module closure (`alice/app` needs `bob/util`,
/// which needs `alice/json`), and a workspace whose `moonbit-registry.toml` points
/// the gateway at it and intercepts moon's own registry hosts.
struct Job {
    _registry: Arc<Registry>,
    _upstream: Upstream,
    dir: tempfile::TempDir,
    listen: String,
    /// What every step runs with: the gateway binary first on `PATH`, and nothing
    /// of this machine's proxy, CA or CI settings.
    env: BTreeMap<String, String>,
}

impl Job {
    async fn start() -> Job {
        let registry = Arc::new(Registry::new());
        registry.publish("alice/json", "0.1.0", &[]);
        registry.publish("bob/util", "0.1.0", &[("alice/json", "0.1.0")]);
        registry.publish(
            "alice/app",
            "1.0.0",
            &[("bob/util", "0.1.0"), ("alice/json", "0.1.0")],
        );
        let upstream = Upstream::start(registry.clone()).await;
        let dir = tempfile::tempdir().expect("temp dir for the CI job");
        let workspace = dir.path().join("workspace");
        std::fs::create_dir_all(&workspace).unwrap();
        std::fs::write(
            workspace.join("moonbit-registry.toml"),
            format!(
                "upstream = \"{}\"\nupstream_ca = \"{}\"\n\
                 intercept_hosts = [\"mooncakes.io\", \"download.mooncakes.io\"]\n\
                 [proxy]\ntunnel = \"deny\"\n",
                upstream.url(),
                upstream.ca_pem.display()
            ),
        )
        .unwrap();
        let exe = PathBuf::from(env!("CARGO_BIN_EXE_moonbit-registry"));
        let path = format!(
            "{}:{}",
            exe.parent().unwrap().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let home = dir.path().join("home");
        let mut env = BTreeMap::new();
        for (k, v) in [
            ("PATH", path),
            ("HOME", home.display().to_string()),
            ("MOON_HOME", home.join(".moon").display().to_string()),
            ("GIT_CONFIG_NOSYSTEM", "1".into()),
            ("GIT_CONFIG_GLOBAL", "/dev/null".into()),
            ("RUST_BACKTRACE", "0".into()),
        ] {
            env.insert(k.to_string(), v);
        }
        Job {
            _registry: registry,
            _upstream: upstream,
            listen: free_local_addr().to_string(),
            dir,
            env,
        }
    }

    fn workspace(&self) -> PathBuf {
        self.dir.path().join("workspace")
    }

    /// Run `script` as the CI system would (`bash -eo pipefail`), in the workspace,
    /// in a process group of its own so whatever it leaves running can be stopped.
    fn bash(&self, script: &str, extra: &BTreeMap<String, String>) -> Output {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new("bash");
        cmd.args(["--noprofile", "--norc", "-eo", "pipefail", "-c", script])
            .current_dir(self.workspace())
            .env_clear()
            .envs(&self.env)
            .envs(extra)
            .process_group(0);
        run(&mut cmd)
    }
}

impl Job {
    /// Stop the gateway a snippet started in the background, and wait until its
    /// port is free (the next job starts its own there).
    fn stop_gateway(&self) {
        let _ = Command::new("pkill")
            .args(["-f", &format!("serve --listen {}", self.listen)])
            .status();
        for _ in 0..100 {
            if std::net::TcpStream::connect(&self.listen).is_err() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("the gateway on {} did not stop", self.listen);
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            self.stop_gateway();
        } else {
            let _ = Command::new("pkill")
                .args(["-f", &format!("serve --listen {}", self.listen)])
                .status();
        }
    }
}

/// `moon update`, `moon new`, `moon add alice/app` in `job`'s workspace, in a
/// shell script a CI job would write.
const MOON_STEPS: &str = "\"$MOON_BIN\" update\n\"$MOON_BIN\" new proj --user tester\n\
                          cd proj && \"$MOON_BIN\" add alice/app\n";

fn assert_closure_installed(job: &Job) {
    for dir in ["alice/app", "bob/util", "alice/json"] {
        let file = job
            .workspace()
            .join("proj/.mooncakes")
            .join(dir)
            .join("moon.mod.json");
        assert!(file.is_file(), "{dir} not installed by moon");
    }
}

/// `${{ inputs.NAME }}` and `${{ runner.temp }}` replaced, as GitHub does before
/// running a composite action's step.
fn expand(text: &str, inputs: &BTreeMap<String, String>, runner_temp: &str) -> String {
    let mut out = text.replace("${{ runner.temp }}", runner_temp);
    for (name, value) in inputs {
        out = out.replace(&format!("${{{{ inputs.{name} }}}}"), value);
    }
    assert!(
        !out.contains("${{"),
        "an expression the test does not know: {out}"
    );
    out
}

/// The composite action, as a workflow uses it: the `start` step, the job's own
/// steps with what the action wrote to `$GITHUB_ENV`, then the `report` step
/// writing the step summary, which counts the closure's three archives, all cold.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn github_action_starts_the_gateway_and_reports_the_job() {
    let Some(moon) = moon_bin() else {
        eprintln!("SKIPPED github_action_starts_the_gateway_and_reports_the_job: set MOON_BIN to the moon client");
        return;
    };
    if !inside_loopback_namespace(
        module_path!(),
        "github_action_starts_the_gateway_and_reports_the_job",
    ) {
        return;
    }
    let job = Job::start().await;
    let action = deploy_yaml("github-action/action.yml");
    let temp = job.dir.path().join("runner-temp");
    std::fs::create_dir_all(&temp).unwrap();
    let (github_env, summary) = (job.dir.path().join("env"), job.dir.path().join("summary"));
    std::fs::write(&github_env, "").unwrap();
    let temp_s = temp.display().to_string();
    let mut runner = BTreeMap::new();
    for (k, v) in [
        ("GITHUB_ENV", github_env.display().to_string()),
        ("GITHUB_STEP_SUMMARY", summary.display().to_string()),
        ("GITHUB_WORKSPACE", job.workspace().display().to_string()),
        ("GITHUB_RUN_ID", "4242".into()),
        ("GITHUB_JOB", "build".into()),
        ("RUNNER_TEMP", temp_s.clone()),
    ] {
        runner.insert(k.to_string(), v);
    }
    // The action's steps for `step: <which>` with `listen` given, the rest defaulted.
    let steps = |which: &str| -> Vec<String> {
        let mut inputs = BTreeMap::new();
        for (name, spec) in action["inputs"].as_hash().expect("inputs") {
            let name = name.as_str().unwrap().to_string();
            let default = spec["default"].as_str().unwrap_or_default();
            inputs.insert(name, expand(default, &BTreeMap::new(), &temp_s));
        }
        inputs.insert("step".into(), which.into());
        inputs.insert("listen".into(), job.listen.clone());
        let wanted = format!("inputs.step == '{which}'");
        action["runs"]["steps"]
            .as_vec()
            .expect("runs.steps")
            .iter()
            .filter(|step| step["if"].as_str() == Some(wanted.as_str()))
            .map(|step| {
                expand(
                    step["run"].as_str().expect("a run script"),
                    &inputs,
                    &temp_s,
                )
            })
            .collect()
    };
    // What later steps of the job see: the runner's variables and `$GITHUB_ENV`.
    let job_env = || {
        let mut env = runner.clone();
        for line in std::fs::read_to_string(&github_env).unwrap().lines() {
            let (k, v) = line.split_once('=').expect("NAME=value in $GITHUB_ENV");
            env.insert(k.to_string(), v.to_string());
        }
        env
    };

    let start = steps("start");
    assert_eq!(start.len(), 1, "one start step");
    ok(&job.bash(&start[0], &runner), "the action's start step");
    let env = job_env();
    assert_eq!(
        env.get("HTTPS_PROXY").map(String::as_str),
        Some(format!("http://4242-build:@{}", job.listen).as_str()),
        "the proxy URL carries the job: {env:?}"
    );
    assert_eq!(
        env.get("MOONBIT_CI_JOB").map(String::as_str),
        Some("4242-build")
    );

    let mut with_moon = env.clone();
    with_moon.insert("MOON_BIN".into(), moon.display().to_string());
    ok(
        &job.bash(MOON_STEPS, &with_moon),
        "moon through the action's exports",
    );
    assert_closure_installed(&job);

    let report = steps("report");
    assert_eq!(report.len(), 1, "one report step");
    ok(
        &job.bash(&report[0], &job_env()),
        "the action's report step",
    );
    let summary = std::fs::read_to_string(&summary).expect("a step summary");
    assert!(
        summary.contains("### moonbit-registry: job `4242-build`"),
        "{summary}"
    );
    assert_first_job_counted(&summary);
}

/// A first job's report: the closure's three archives, each either fetched cold
/// or (prefetched while moon asked for the one needing it) from the cache, and at
/// least the first one cold.
fn assert_first_job_counted(report: &str) {
    let row = |name: &str| -> u64 {
        report
            .lines()
            .find_map(|l| l.strip_prefix(&format!("| {name} | ")))
            .and_then(|rest| rest.trim_end_matches(" |").parse().ok())
            .unwrap_or_else(|| panic!("no {name} row in the report:\n{report}"))
    };
    let (archives, cached, cold) = (
        row("archives"),
        row("archives from cache"),
        row("modules fetched cold"),
    );
    assert_eq!(archives, 3, "{report}");
    assert_eq!(cached + cold, 3, "{report}");
    assert!(cold >= 1, "{report}");
    assert!(report.contains(", 0 errors) |"), "{report}");
}

/// The GitLab CI template: `before_script` and the job's script in one shell (as
/// GitLab runs them), `after_script` in another, found again by `CI_JOB_ID`. A
/// second job on the same data dir (the template's cache) gets every archive from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gitlab_template_starts_the_gateway_and_reports_the_job() {
    let Some(moon) = moon_bin() else {
        eprintln!("SKIPPED gitlab_template_starts_the_gateway_and_reports_the_job: set MOON_BIN to the moon client");
        return;
    };
    if !inside_loopback_namespace(
        module_path!(),
        "gitlab_template_starts_the_gateway_and_reports_the_job",
    ) {
        return;
    }
    let job = Job::start().await;
    let ci = deploy_yaml("gitlab-ci.yml");
    let template = &ci[".moonbit-registry"];
    let lines = |key: &str| -> String {
        template[key]
            .as_vec()
            .unwrap_or_else(|| panic!("{key} in the template"))
            .iter()
            .map(|l| format!("{}\n", l.as_str().expect("a script line")))
            .collect()
    };
    let workspace = job.workspace().display().to_string();
    for (ci_job, first) in [("777", true), ("778", false)] {
        let mut env = BTreeMap::new();
        env.insert("CI_PROJECT_DIR".to_string(), workspace.clone());
        env.insert("CI_JOB_ID".to_string(), ci_job.to_string());
        // The template's variables, as GitLab expands them, but on a free port.
        for (name, value) in template["variables"].as_hash().expect("variables") {
            let value = value
                .as_str()
                .unwrap()
                .replace("$CI_PROJECT_DIR", &workspace);
            env.insert(name.as_str().unwrap().to_string(), value);
        }
        env.insert("MBR_LISTEN".into(), job.listen.clone());
        // A new runner: moon's own cache starts empty.
        let home = job.dir.path().join(format!("home-{ci_job}"));
        env.insert("MOON_HOME".into(), home.display().to_string());
        let mut with_moon = env.clone();
        with_moon.insert("MOON_BIN".into(), moon.display().to_string());
        let _ = std::fs::remove_dir_all(job.workspace().join("proj"));
        let script = format!("{}{MOON_STEPS}", lines("before_script"));
        ok(
            &job.bash(&script, &with_moon),
            "before_script and the job's script",
        );
        assert_closure_installed(&job);
        let out = job.bash(&lines("after_script"), &env);
        ok(&out, "after_script");
        let report = String::from_utf8_lossy(&out.stdout);
        assert!(
            report.contains(&format!("### moonbit-registry: job `{ci_job}`")),
            "{report}"
        );
        if first {
            assert_first_job_counted(&report);
        } else {
            for line in [
                "| archives | 3 |",
                "| archives from cache | 3 |",
                "| modules fetched cold | 0 |",
            ] {
                assert!(report.contains(line), "{line:?} in the report:\n{report}");
            }
        }
        // The next job starts its own gateway, as a new CI job would.
        job.stop_gateway();
    }
}
