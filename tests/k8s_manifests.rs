//! The Kubernetes manifests (`k8s/*.yaml`) against the binary they deploy. `scripts/validate_k8s.sh` checks them
//! against the Kubernetes schemas; this checks what no schema knows: that every flag and `TANDEM_*` variable given to
//! a role is one `tandem <role> --help` lists, that each container port is the port the role listens on, that the
//! probe paths answer 200 on the roles started for real (on a real nats-server, with the manifests' own arguments and
//! settings), and that the objects refer to each other correctly (Services and probes to named ports, envFrom to
//! ConfigMaps, volumes to claims, NetworkPolicies to ports), with limits, GPUs and a non-root read-only container
//! everywhere the issue asks for them.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use support::{TandemRole, free_port, request};
use tandem_events::nats_server::NatsServer;
use yaml_rust2::{Yaml, YamlLoader};

const MANIFESTS: [&str; 3] = ["nats.yaml", "tandem.yaml", "jaeger.yaml"];

/// Every object of every manifest, as JSON, with the file it came from.
fn objects() -> Vec<(String, Value)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("k8s");
    let mut objects = Vec::new();
    for file in MANIFESTS {
        let path = dir.join(file);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|error| panic!("reading {}: {error}", path.display()));
        let documents = YamlLoader::load_from_str(&text)
            .unwrap_or_else(|error| panic!("{file} is not YAML: {error}"));
        for document in &documents {
            if matches!(document, Yaml::Null) {
                continue; // an empty document between two `---`
            }
            objects.push((file.to_string(), to_json(document)));
        }
    }
    objects
}

fn to_json(yaml: &Yaml) -> Value {
    match yaml {
        Yaml::Null => Value::Null,
        Yaml::Boolean(value) => Value::Bool(*value),
        Yaml::Integer(value) => Value::from(*value),
        Yaml::Real(text) => text
            .parse::<f64>()
            .map(Value::from)
            .unwrap_or_else(|_| panic!("not a number: {text}")),
        Yaml::String(text) => Value::String(text.clone()),
        Yaml::Array(items) => Value::Array(items.iter().map(to_json).collect()),
        Yaml::Hash(entries) => Value::Object(
            entries
                .iter()
                .map(|(key, value)| {
                    let key = match key {
                        Yaml::String(text) => text.clone(),
                        Yaml::Integer(number) => number.to_string(),
                        other => panic!("a mapping key that is not a string: {other:?}"),
                    };
                    (key, to_json(value))
                })
                .collect::<Map<String, Value>>(),
        ),
        Yaml::Alias(_) | Yaml::BadValue => panic!("YAML aliases are not used in the manifests"),
    }
}

fn kind(object: &Value) -> &str {
    object["kind"].as_str().expect("every object has a kind")
}

fn name(object: &Value) -> &str {
    object["metadata"]["name"]
        .as_str()
        .expect("every object has a name")
}

fn find<'a>(objects: &'a [(String, Value)], kind_wanted: &str, name_wanted: &str) -> &'a Value {
    objects
        .iter()
        .map(|(_, object)| object)
        .find(|object| kind(object) == kind_wanted && name(object) == name_wanted)
        .unwrap_or_else(|| panic!("no {kind_wanted} named {name_wanted} in k8s/"))
}

fn workloads(objects: &[(String, Value)]) -> impl Iterator<Item = &Value> {
    objects
        .iter()
        .map(|(_, object)| object)
        .filter(|object| matches!(kind(object), "Deployment" | "StatefulSet"))
}

fn containers(workload: &Value) -> &Vec<Value> {
    workload["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("a workload has containers")
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|item| item.as_str().expect("a string").to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// A container's port number by name.
fn container_port(container: &Value, port_name: &str) -> Option<u16> {
    container["ports"]
        .as_array()?
        .iter()
        .find(|port| port["name"] == port_name)
        .and_then(|port| port["containerPort"].as_u64())
        .map(|port| port as u16)
}

/// Whether a label selector (`matchLabels`, and `matchExpressions` with `In`) selects these labels.
fn selects(selector: &Value, labels: &Value) -> bool {
    let match_labels = selector
        .get("matchLabels")
        .and_then(Value::as_object)
        .is_none_or(|wanted| {
            wanted
                .iter()
                .all(|(key, value)| labels.get(key) == Some(value))
        });
    let match_expressions = selector
        .get("matchExpressions")
        .and_then(Value::as_array)
        .is_none_or(|expressions| {
            expressions.iter().all(|expression| {
                assert_eq!(expression["operator"], "In", "only `In` is used");
                let key = expression["key"].as_str().expect("a key");
                expression["values"]
                    .as_array()
                    .expect("values")
                    .iter()
                    .any(|value| labels.get(key) == Some(value))
            })
        });
    match_labels && match_expressions
}

/// The environment a container gets: its ConfigMaps (envFrom) then its own `env` (which wins), with `valueFrom`
/// entries as `None` (the kubelet fills them in).
fn environment(objects: &[(String, Value)], container: &Value) -> BTreeMap<String, Option<String>> {
    let mut variables = BTreeMap::new();
    for source in container["envFrom"].as_array().into_iter().flatten() {
        let config_map = source["configMapRef"]["name"]
            .as_str()
            .expect("envFrom uses configMapRef");
        let data = find(objects, "ConfigMap", config_map)["data"]
            .as_object()
            .unwrap_or_else(|| panic!("ConfigMap {config_map} has data"));
        for (key, value) in data {
            let value = value
                .as_str()
                .unwrap_or_else(|| panic!("ConfigMap {config_map}: {key} must be a string"));
            variables.insert(key.clone(), Some(value.to_string()));
        }
    }
    for variable in container["env"].as_array().into_iter().flatten() {
        let key = variable["name"].as_str().expect("an env name").to_string();
        variables.insert(key, variable["value"].as_str().map(str::to_string));
    }
    variables
}

/// What `tandem <role> --help` says about one option.
#[derive(Debug, Default)]
struct HelpOption {
    env: Option<String>,
    default: Option<String>,
}

/// The options of `tandem <role>`, read from its `--help`: long flag → env var and default.
fn help_options(role: &str) -> BTreeMap<String, HelpOption> {
    let output = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args([role, "--help"])
        .env("NO_COLOR", "1")
        .output()
        .expect("tandem runs");
    assert!(output.status.success(), "tandem {role} --help failed");
    let text = String::from_utf8(output.stdout).expect("UTF-8 help");
    // One block per option: it starts at a line whose first non-blank character is '-'.
    let mut blocks: Vec<String> = Vec::new();
    for line in text.lines() {
        if line.trim_start().starts_with('-') {
            blocks.push(line.to_string());
        } else if let Some(block) = blocks.last_mut() {
            block.push(' ');
            block.push_str(line.trim());
        }
    }
    let between = |block: &str, start: &str, end: &[char]| {
        block.find(start).map(|at| {
            let rest = &block[at + start.len()..];
            rest[..rest.find(end).expect("closed")].to_string()
        })
    };
    blocks
        .iter()
        .filter_map(|block| {
            let flag = block
                .split([' ', ','])
                .find(|word| word.starts_with("--"))?
                .to_string();
            Some((
                flag,
                HelpOption {
                    // A secret's value is hidden (`[env: TANDEM_API_KEYS]`, no `=`).
                    env: between(block, "[env: ", &['=', ']']),
                    default: between(block, "[default: ", &[']']),
                },
            ))
        })
        .collect()
}

/// The value of `--flag VALUE` in `args`.
fn flag_value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter()
        .position(|arg| arg == flag)
        .map(|at| args.get(at + 1).expect("a flag with a value").as_str())
}

/// The tandem containers, with their workload: (workload name, subcommand, container).
fn tandem_containers(objects: &[(String, Value)]) -> Vec<(String, String, Value)> {
    let mut found = Vec::new();
    for workload in workloads(objects) {
        for container in containers(workload) {
            let image = container["image"].as_str().expect("an image");
            if image.starts_with("tandem:") {
                let args = strings(&container["args"]);
                let role = args.first().expect("args start with the role").clone();
                found.push((name(workload).to_string(), role, container.clone()));
            }
        }
    }
    found
}

/// The port a role listens on for HTTP: its `--port`/`--http-port` argument, its env var, or the default.
fn listening_port(
    objects: &[(String, Value)],
    role: &str,
    container: &Value,
    options: &BTreeMap<String, HelpOption>,
) -> u16 {
    let flag = if role == "gateway" {
        "--port"
    } else {
        "--http-port"
    };
    let option = options
        .get(flag)
        .unwrap_or_else(|| panic!("tandem {role} has no {flag}"));
    let args = strings(&container["args"]);
    let env = environment(objects, container);
    let value = flag_value(&args, flag)
        .map(str::to_string)
        .or_else(|| {
            let variable = option.env.as_ref().expect("an env var");
            env.get(variable).cloned().flatten()
        })
        .or_else(|| option.default.clone())
        .unwrap_or_else(|| panic!("tandem {role} {flag} has no value"));
    value.parse().expect("a port number")
}

#[test]
fn every_flag_and_variable_is_one_the_role_accepts_and_ports_are_the_ones_it_listens_on() {
    let objects = objects();
    let containers = tandem_containers(&objects);
    let roles: BTreeSet<&str> = containers
        .iter()
        .map(|(_, role, _)| role.as_str())
        .collect();
    assert_eq!(
        roles,
        BTreeSet::from(["decode", "gateway", "prefill", "scheduler"]),
        "one workload per role"
    );
    for (workload, role, container) in &containers {
        let options = help_options(role);
        let args = strings(&container["args"]);
        for flag in args.iter().filter(|arg| arg.starts_with("--")) {
            assert!(
                options.contains_key(flag),
                "{workload}: `tandem {role}` has no flag {flag}"
            );
        }
        let accepted: BTreeSet<&str> = options
            .values()
            .filter_map(|option| option.env.as_deref())
            .collect();
        for variable in environment(&objects, container).keys() {
            if variable.starts_with("TANDEM_") {
                assert!(
                    accepted.contains(variable.as_str()),
                    "{workload}: `tandem {role}` reads no {variable} (it reads {accepted:?})"
                );
            }
        }
        let port = listening_port(&objects, role, container, &options);
        assert_eq!(
            container_port(container, "http"),
            Some(port),
            "{workload}: the container port `http` is the port tandem {role} listens on"
        );
        if role == "decode" {
            // The KV receiver's port: where prefill workers are told to send KV, and the port they are let in on.
            let listen = environment(&objects, container)
                .get("TANDEM_KV_LISTEN")
                .cloned()
                .flatten()
                .expect("decode sets TANDEM_KV_LISTEN");
            let (host, kv_port) = listen.rsplit_once(':').expect("host:port");
            assert_eq!(host, "$(POD_IP)", "prefill workers reach the pod's own IP");
            assert_eq!(
                container_port(container, "kv"),
                Some(kv_port.parse().unwrap()),
                "{workload}: the container port `kv` is TANDEM_KV_LISTEN's"
            );
        }
        if matches!(role.as_str(), "decode" | "prefill") {
            assert_eq!(
                flag_value(&args, "--device"),
                Some("cuda:0"),
                "{workload}: GPU workers run on the GPU they are given"
            );
        }
    }
}

#[test]
fn manifests_wire_together() {
    let objects = objects();
    let mut seen = BTreeSet::new();
    for (file, object) in &objects {
        assert!(
            object["apiVersion"].is_string(),
            "{file}: every object has an apiVersion"
        );
        assert!(
            seen.insert((kind(object).to_string(), name(object).to_string())),
            "{file}: {} {} is defined twice",
            kind(object),
            name(object)
        );
        // No etcd: discovery is the log and its KV buckets.
        assert!(
            !object.to_string().to_lowercase().contains("etcd"),
            "{file}: {} {} mentions etcd",
            kind(object),
            name(object)
        );
    }

    for workload in workloads(&objects) {
        let workload_name = name(workload);
        let pod = &workload["spec"]["template"]["spec"];
        let pod_labels = &workload["spec"]["template"]["metadata"]["labels"];
        assert!(
            selects(&workload["spec"]["selector"], pod_labels),
            "{workload_name}: its selector selects its own pods"
        );
        assert_eq!(
            pod["securityContext"]["runAsNonRoot"], true,
            "{workload_name}: pods run as non-root"
        );
        assert_eq!(
            pod["automountServiceAccountToken"], false,
            "{workload_name}: no pod needs the Kubernetes API"
        );
        let claims: Vec<String> = workload["spec"]["volumeClaimTemplates"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|claim| name(claim).to_string())
            .collect();
        for volume in pod["volumes"].as_array().into_iter().flatten() {
            if let Some(claim) = volume["persistentVolumeClaim"]["claimName"].as_str() {
                find(&objects, "PersistentVolumeClaim", claim);
            }
            if let Some(config_map) = volume["configMap"]["name"].as_str() {
                find(&objects, "ConfigMap", config_map);
            }
        }
        for container in containers(workload) {
            let security = &container["securityContext"];
            assert_eq!(
                security["allowPrivilegeEscalation"], false,
                "{workload_name}"
            );
            assert_eq!(security["readOnlyRootFilesystem"], true, "{workload_name}");
            assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]));
            for bound in ["requests", "limits"] {
                for resource in ["cpu", "memory"] {
                    assert!(
                        container["resources"][bound][resource].is_string(),
                        "{workload_name}: {bound}.{resource} is set"
                    );
                }
            }
            for probe in ["livenessProbe", "readinessProbe"] {
                let port = &container[probe]["httpGet"]["port"];
                let port = port.as_str().expect("probes use named ports");
                assert!(
                    container_port(container, port).is_some(),
                    "{workload_name}: {probe} uses port {port}, which the container does not declare"
                );
            }
            // A volume mount names a volume of the pod or a claim template.
            for mount in container["volumeMounts"].as_array().into_iter().flatten() {
                let volume = mount["name"].as_str().expect("a mount name");
                let declared = pod["volumes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|candidate| candidate["name"] == volume)
                    || claims.iter().any(|claim| claim == volume);
                assert!(declared, "{workload_name}: no volume {volume}");
            }
            // `$(NAME)` in a value refers to a variable defined earlier in the same container.
            let mut defined = BTreeSet::new();
            for variable in container["env"].as_array().into_iter().flatten() {
                if let Some(value) = variable["value"].as_str()
                    && let Some(start) = value.find("$(")
                {
                    let referenced = &value[start + 2..start + value[start..].find(')').unwrap()];
                    assert!(
                        defined.contains(referenced),
                        "{workload_name}: $({referenced}) is used before it is defined"
                    );
                }
                defined.insert(variable["name"].as_str().unwrap().to_string());
            }
        }
    }

    // Services send their ports to named ports of the pods they select.
    for service in objects
        .iter()
        .map(|(_, o)| o)
        .filter(|o| kind(o) == "Service")
    {
        let service_name = name(service);
        let selector = serde_json::json!({"matchLabels": service["spec"]["selector"]});
        let pods: Vec<&Value> = workloads(&objects)
            .filter(|w| selects(&selector, &w["spec"]["template"]["metadata"]["labels"]))
            .collect();
        assert!(!pods.is_empty(), "Service {service_name} selects no pods");
        for port in service["spec"]["ports"].as_array().expect("ports") {
            let target = port["targetPort"].as_str().expect("named target ports");
            for workload in &pods {
                assert!(
                    containers(workload)
                        .iter()
                        .any(|c| container_port(c, target).is_some()),
                    "Service {service_name}: {} declares no port {target}",
                    name(workload)
                );
            }
        }
    }
    let service_port = |service: &str, port_name: &str| {
        find(&objects, "Service", service)["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|port| port["name"] == port_name)
            .and_then(|port| port["port"].as_u64())
            .unwrap_or_else(|| panic!("Service {service} has no port {port_name}"))
    };
    assert_eq!(service_port("tandem-gateway", "http"), 8000);
    assert_eq!(service_port("nats", "client"), 4222);
    assert_eq!(service_port("jaeger", "otlp-grpc"), 4317);
    assert_eq!(service_port("jaeger", "otlp-http"), 4318);
    assert_eq!(service_port("jaeger", "ui"), 16686);
    let common = &find(&objects, "ConfigMap", "tandem-common")["data"];
    assert_eq!(common["TANDEM_NATS"], "nats://nats:4222");
    assert_eq!(common["OTEL_EXPORTER_OTLP_ENDPOINT"], "http://jaeger:4317");
    // 4317 is Jaeger's gRPC port: the exporter must be told to speak gRPC there.
    assert_eq!(common["OTEL_EXPORTER_OTLP_PROTOCOL"], "grpc");

    // Every role exports its traces to Jaeger under its own service name.
    for (workload, _, container) in tandem_containers(&objects) {
        let env = environment(&objects, &container);
        assert_eq!(
            env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                .cloned()
                .flatten()
                .as_deref(),
            Some("http://jaeger:4317"),
            "{workload}"
        );
        assert_eq!(
            env.get("OTEL_SERVICE_NAME").cloned().flatten().as_deref(),
            Some(workload.as_str()),
            "{workload}: its traces are named after it"
        );
    }

    // The servers' own configuration listens where their containers and probes say.
    let jaeger = &containers(find(&objects, "Deployment", "jaeger"))[0];
    let jaeger_config_text = find(&objects, "ConfigMap", "jaeger-config")["data"]["config.yaml"]
        .as_str()
        .expect("Jaeger's config");
    let jaeger_config = to_json(&YamlLoader::load_from_str(jaeger_config_text).unwrap()[0]);
    let endpoint_port = |pointer: &str| -> u16 {
        let endpoint = jaeger_config
            .pointer(pointer)
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("Jaeger's config has no {pointer}"));
        assert!(
            endpoint.starts_with("0.0.0.0:"),
            "{pointer} listens on every interface"
        );
        endpoint.rsplit_once(':').unwrap().1.parse().unwrap()
    };
    for (pointer, port_name) in [
        ("/receivers/otlp/protocols/grpc/endpoint", "otlp-grpc"),
        ("/receivers/otlp/protocols/http/endpoint", "otlp-http"),
        ("/extensions/jaeger_query/http/endpoint", "ui"),
        ("/extensions/healthcheckv2/http/endpoint", "health"),
    ] {
        assert_eq!(
            Some(endpoint_port(pointer)),
            container_port(jaeger, port_name),
            "Jaeger: {pointer}"
        );
    }
    assert_eq!(
        jaeger_config.pointer("/extensions/healthcheckv2/http/status/path"),
        jaeger["readinessProbe"]["httpGet"].get("path"),
        "Jaeger's readiness probe asks its health check's path"
    );
    let nats = &containers(find(&objects, "StatefulSet", "nats"))[0];
    let nats_config = find(&objects, "ConfigMap", "nats-config")["data"]["nats.conf"]
        .as_str()
        .expect("the NATS config");
    for (setting, port_name) in [("listen", "client"), ("http", "monitor")] {
        let port = container_port(nats, port_name).expect("a NATS port");
        assert!(
            nats_config.contains(&format!("\n{setting}: 0.0.0.0:{port}\n")),
            "nats.conf: {setting} on the container port {port_name} ({port})"
        );
    }

    // Persistent state where the issue wants it: JetStream's store and the scheduler's redb.
    for (statefulset, mount) in [("nats", "/data"), ("tandem-scheduler", "/var/lib/tandem")] {
        let set = find(&objects, "StatefulSet", statefulset);
        let claim = name(&set["spec"]["volumeClaimTemplates"][0]).to_string();
        let mounted = containers(set)[0]["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["name"] == claim.as_str() && m["mountPath"] == mount);
        assert!(
            mounted,
            "{statefulset} keeps its state on its claim at {mount}"
        );
    }
    let scheduler = containers(find(&objects, "StatefulSet", "tandem-scheduler"))[0].clone();
    assert_eq!(
        environment(&objects, &scheduler)["TANDEM_DATA_DIR"].as_deref(),
        Some("/var/lib/tandem")
    );
    // GPU workers ask for a GPU and read the model from the shared volume.
    for deployment in ["tandem-decode", "tandem-prefill"] {
        let container = &containers(find(&objects, "Deployment", deployment))[0];
        assert_eq!(
            container["resources"]["limits"]["nvidia.com/gpu"], 1,
            "{deployment}"
        );
        let model = environment(&objects, container)["TANDEM_MODEL"]
            .clone()
            .expect("a model path");
        let on_volume = container["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["name"] == "models" && model.starts_with(m["mountPath"].as_str().unwrap()));
        assert!(on_volume, "{deployment}: {model} is on the models volume");
    }

    // Only the gateway takes traffic from anywhere; every other ingress rule names its peers.
    let policies: Vec<&Value> = objects
        .iter()
        .map(|(_, o)| o)
        .filter(|o| kind(o) == "NetworkPolicy")
        .collect();
    for workload in workloads(&objects) {
        let labels = &workload["spec"]["template"]["metadata"]["labels"];
        let covering: Vec<&&Value> = policies
            .iter()
            .filter(|policy| selects(&policy["spec"]["podSelector"], labels))
            .collect();
        assert!(
            !covering.is_empty(),
            "{}: no NetworkPolicy selects it, so anything may reach it",
            name(workload)
        );
        for policy in covering {
            for rule in policy["spec"]["ingress"].as_array().expect("ingress rules") {
                let open_to_all = rule.get("from").is_none();
                assert_eq!(
                    open_to_all,
                    name(workload) == "tandem-gateway",
                    "NetworkPolicy {}: only the gateway is reachable from outside",
                    name(policy)
                );
                for port in rule["ports"].as_array().expect("rules name their ports") {
                    let port = port["port"].as_str().expect("named ports");
                    assert!(
                        containers(workload)
                            .iter()
                            .any(|c| container_port(c, port).is_some()),
                        "NetworkPolicy {}: {} has no port {port}",
                        name(policy),
                        name(workload)
                    );
                }
            }
        }
    }
}

/// The Secret and key a container's variable comes from (`valueFrom.secretKeyRef`).
fn secret_ref(container: &Value, variable: &str) -> Option<(String, String)> {
    container["env"]
        .as_array()?
        .iter()
        .find(|entry| entry["name"] == variable)
        .map(|entry| &entry["valueFrom"]["secretKeyRef"])
        .and_then(|reference| {
            Some((
                reference["name"].as_str()?.to_string(),
                reference["key"].as_str()?.to_string(),
            ))
        })
}

#[test]
fn nats_and_every_role_take_the_nats_credentials_from_one_secret() {
    let objects = objects();
    let nats = workloads(&objects)
        .find(|workload| name(workload) == "nats")
        .expect("the nats StatefulSet");
    let server = &containers(nats)[0];
    let server_user = secret_ref(server, "NATS_USER").expect("nats reads NATS_USER from a Secret");
    let server_password =
        secret_ref(server, "NATS_PASSWORD").expect("nats reads NATS_PASSWORD from a Secret");
    let config = find(&objects, "ConfigMap", "nats-config")["data"]["nats.conf"]
        .as_str()
        .expect("nats.conf");
    assert!(
        config.contains("user: $NATS_USER") && config.contains("password: $NATS_PASSWORD"),
        "nats.conf requires the Secret's user and password:\n{config}"
    );
    for (workload, _, container) in tandem_containers(&objects) {
        assert_eq!(
            secret_ref(&container, "TANDEM_NATS_USER").as_ref(),
            Some(&server_user),
            "{workload}: TANDEM_NATS_USER from the server's Secret"
        );
        assert_eq!(
            secret_ref(&container, "TANDEM_NATS_PASSWORD").as_ref(),
            Some(&server_password),
            "{workload}: TANDEM_NATS_PASSWORD from the server's Secret"
        );
    }
}

/// Replaces the value of `--flag` in `args`, or appends the flag.
fn set_flag(args: &mut Vec<String>, flag: &str, value: &str) {
    match args.iter().position(|arg| arg == flag) {
        Some(at) => args[at + 1] = value.to_string(),
        None => args.extend([flag.to_string(), value.to_string()]),
    }
}

/// Waits until `GET path` answers 200; panics with the role's log if it never does or the role exits (a flag or a
/// setting it refuses).
fn wait_for_200(role: &mut TandemRole, port: u16, path: &str, timeout: Duration) {
    let started = Instant::now();
    let mut last = None;
    while started.elapsed() < timeout {
        if let Some(status) = role.exited() {
            panic!(
                "{} exited ({status}) before GET {path} answered 200; its log:\n{}",
                role.name,
                role.log()
            );
        }
        match request(port, "GET", path, None) {
            Ok((200, _)) => return,
            answer => last = Some(format!("{answer:?}")),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "{}: GET {path} never answered 200 (last: {last:?}); its log:\n{}",
        role.name,
        role.log()
    );
}

#[test]
fn probe_paths_answer_on_the_roles_started_with_the_manifests_settings() {
    let objects = objects();
    let nats = NatsServer::start().unwrap_or_else(|error| panic!("{error}"));
    let dir = tempfile::tempdir().expect("a temp dir");
    // Decode first: the gateway is ready only once a decode worker has a heartbeat.
    let mut containers = tandem_containers(&objects);
    let order = ["decode", "prefill", "scheduler", "gateway"];
    containers.sort_by_key(|(_, role, _)| order.iter().position(|r| r == role));
    let mut running = Vec::new();
    for (workload, role, container) in &containers {
        // The manifest's arguments and settings, less what only a cluster has: its NATS and model paths, a GPU, the
        // pod's IP and name, fixed ports (here free loopback ones) and the trace collector.
        let mut args = strings(&container["args"]);
        if flag_value(&args, "--device").is_some() {
            set_flag(&mut args, "--device", "cpu");
        }
        let port = free_port();
        if role == "gateway" {
            set_flag(&mut args, "--host", "127.0.0.1");
            set_flag(&mut args, "--port", &port.to_string());
        } else {
            set_flag(&mut args, "--http-host", "127.0.0.1");
            set_flag(&mut args, "--http-port", &port.to_string());
        }
        let mut env = vec![("NO_COLOR".to_string(), "1".to_string())];
        for (key, value) in environment(&objects, container) {
            let value = match key.as_str() {
                "TANDEM_NATS" => Some(nats.url()),
                "TANDEM_MODEL" | "OTEL_EXPORTER_OTLP_ENDPOINT" => None,
                "TANDEM_DATA_DIR" => Some(dir.path().join(workload).display().to_string()),
                "TANDEM_KV_LISTEN" => Some("127.0.0.1:0".to_string()),
                "TANDEM_WORKER_ID" | "TANDEM_SCHEDULER_ID" => Some(format!("{workload}-0")),
                _ => value,
            };
            if let Some(value) = value {
                env.push((key, value));
            }
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let role_process = TandemRole::spawn_with_env(workload, &args, &env, dir.path());
        running.push((role.clone(), role_process, port, container.clone()));
    }
    for (role, process, port, container) in &mut running {
        let liveness = container["livenessProbe"]["httpGet"]["path"]
            .as_str()
            .expect("a liveness path");
        let readiness = container["readinessProbe"]["httpGet"]["path"]
            .as_str()
            .expect("a readiness path");
        wait_for_200(process, *port, liveness, Duration::from_secs(120));
        wait_for_200(process, *port, readiness, Duration::from_secs(120));
        // The paths are routes, not a server that answers 200 to anything.
        let (status, _) = request(*port, "GET", "/no-such-probe", None).expect("the role answers");
        assert_eq!(status, 404, "tandem {role} answers 404 off its routes");
        // Each role's port also serves its Prometheus metrics.
        let (status, _) = request(*port, "GET", "/metrics", None).expect("the role answers");
        assert_eq!(status, 200, "tandem {role} serves /metrics");
    }
    for (_, mut process, _, _) in running.into_iter().rev() {
        process.stop();
    }
}
