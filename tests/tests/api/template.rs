//! template.yaml, read as CloudFormation reads it: the properties the relay
//! depends on in AWS (streaming integration, timeouts, build settings,
//! environment, table, least-privilege IAM, no secrets, and dashboard and
//! alarms that name the metrics the code emits).

use std::collections::{BTreeMap, BTreeSet};

use relay_shared::domain::key::PresentedKey;
use relay_shared::domain::now;
use relay_shared::domain::usage::TokenUsage;
use relay_shared::domain::usage::UsageRecord;
use relay_shared::metrics::{DEFAULT_NAMESPACE, request_document};
use relay_shared::store::{GSI1, TTL_ATTRIBUTE};
use serde_norway::Value;

const TEMPLATE: &str = include_str!("../../../template.yaml");

/// The functions: logical id, binary (= Cargo package) and its manifest.
const FUNCTIONS: [(&str, &str, &str); 3] = [
    (
        "ProxyFunction",
        "relay-proxy",
        include_str!("../../../functions/proxy/Cargo.toml"),
    ),
    (
        "AdminFunction",
        "relay-admin",
        include_str!("../../../functions/admin/Cargo.toml"),
    ),
    (
        "UsageFunction",
        "relay-usage",
        include_str!("../../../functions/usage/Cargo.toml"),
    ),
];

/// Sources that emit the counted-event metrics (`metrics::emit_event`).
const EVENT_EMITTERS: [&str; 3] = [
    include_str!("../../../shared/src/proxy/mod.rs"),
    include_str!("../../../shared/src/proxy/finish.rs"),
    include_str!("../../../shared/src/http/admin/mod.rs"),
];

fn template() -> Value {
    serde_norway::from_str(TEMPLATE).expect("template.yaml is YAML")
}

/// The value under a CloudFormation tag (`!Ref`, `!Sub`, `!If`, `!GetAtt` …).
fn untag(value: &Value) -> &Value {
    let mut value = value;
    while let Value::Tagged(tagged) = value {
        value = &tagged.value;
    }
    value
}

/// The tag of a tagged value, without its `!`.
fn tag_of(value: &Value) -> Option<String> {
    match value {
        Value::Tagged(tagged) => Some(tagged.tag.to_string().trim_start_matches('!').to_owned()),
        _ => None,
    }
}

fn get<'a>(value: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter()
        .try_fold(value, |value, key| untag(value).get(*key))
}

fn at<'a>(value: &'a Value, path: &[&str]) -> &'a Value {
    get(value, path).unwrap_or_else(|| panic!("template.yaml has no {}", path.join(".")))
}

/// A plain or tagged string (`!Sub "…"` gives its format string).
fn text(value: &Value) -> &str {
    untag(value)
        .as_str()
        .unwrap_or_else(|| panic!("expected a string, found {value:?}"))
}

/// A string or a list of strings (IAM `Action`).
fn strings(value: &Value) -> Vec<String> {
    match untag(value) {
        Value::String(s) => vec![s.clone()],
        Value::Sequence(items) => items.iter().map(|i| text(i).to_owned()).collect(),
        other => panic!("expected a string or a list, found {other:?}"),
    }
}

fn resource<'a>(template: &'a Value, id: &str) -> &'a Value {
    at(template, &["Resources", id])
}

/// A function property, from the function or else from Globals.
fn function_property<'a>(template: &'a Value, function: &str, name: &str) -> Option<&'a Value> {
    get(template, &["Resources", function, "Properties", name])
        .or_else(|| get(template, &["Globals", "Function", name]))
}

/// The function's environment: Globals' variables overridden by its own.
fn environment(template: &Value, function: &str) -> BTreeMap<String, Value> {
    let mut variables = BTreeMap::new();
    for path in [
        &["Globals", "Function", "Environment", "Variables"][..],
        &[
            "Resources",
            function,
            "Properties",
            "Environment",
            "Variables",
        ],
    ] {
        if let Some(Value::Mapping(map)) = get(template, path).map(untag) {
            for (name, value) in map {
                variables.insert(text(name).to_owned(), value.clone());
            }
        }
    }
    variables
}

/// The API's OpenAPI integration for a path (any method).
fn integration<'a>(template: &'a Value, path: &str) -> &'a Value {
    at(
        template,
        &[
            "Resources",
            "RelayApi",
            "Properties",
            "DefinitionBody",
            "paths",
            path,
            "x-amazon-apigateway-any-method",
            "x-amazon-apigateway-integration",
        ],
    )
}

struct Statement {
    effect: String,
    actions: Vec<String>,
    resource: Value,
    condition: Option<Value>,
}

/// The function's IAM statements. Only explicit policy documents are
/// allowed: SAM policy templates (DynamoDBCrudPolicy …) grant more than
/// each function needs.
fn statements(template: &Value, function: &str) -> Vec<Statement> {
    let policies = at(template, &["Resources", function, "Properties", "Policies"]);
    let Value::Sequence(policies) = untag(policies) else {
        panic!("{function}: Policies is not a list");
    };
    let mut statements = Vec::new();
    for policy in policies {
        let statement_list = get(policy, &["Statement"]).unwrap_or_else(|| {
            panic!("{function}: every policy must be an explicit document, found {policy:?}")
        });
        let Value::Sequence(list) = untag(statement_list) else {
            panic!("{function}: Statement is not a list");
        };
        for statement in list {
            statements.push(Statement {
                effect: text(at(statement, &["Effect"])).to_owned(),
                actions: strings(at(statement, &["Action"])),
                resource: at(statement, &["Resource"]).clone(),
                condition: get(statement, &["Condition"]).cloned(),
            });
        }
    }
    statements
}

fn allowed_actions(template: &Value, function: &str) -> BTreeSet<String> {
    statements(template, function)
        .into_iter()
        .filter(|s| s.effect == "Allow")
        .flat_map(|s| s.actions)
        .collect()
}

const STREAMED_PATHS: [&str; 3] = ["/v1/{proxy+}", "/api/{proxy+}", "/{proxy+}"];
const BUFFERED_PATHS: [(&str, &str); 5] = [
    ("/admin", "AdminFunction"),
    ("/admin/{proxy+}", "AdminFunction"),
    ("/api/usage", "UsageFunction"),
    ("/api/usage/{proxy+}", "UsageFunction"),
    ("/health", "UsageFunction"),
];

#[test]
fn proxy_routes_stream_through_invoke_with_response_stream_for_15_minutes() {
    let template = template();
    assert_eq!(
        text(at(
            &template,
            &[
                "Resources",
                "RelayApi",
                "Properties",
                "EndpointConfiguration",
                "Type"
            ]
        )),
        "REGIONAL"
    );
    for path in STREAMED_PATHS {
        let integration = integration(&template, path);
        assert_eq!(text(at(integration, &["type"])), "aws_proxy", "{path}");
        assert_eq!(text(at(integration, &["httpMethod"])), "POST", "{path}");
        assert_eq!(
            text(at(integration, &["responseTransferMode"])),
            "STREAM",
            "{path}"
        );
        assert_eq!(
            at(integration, &["timeoutInMillis"]).as_u64(),
            Some(900_000),
            "{path}"
        );
        let uri = at(integration, &["uri"]);
        assert_eq!(tag_of(uri).as_deref(), Some("Sub"), "{path}");
        assert!(
            text(uri).ends_with(
                ":lambda:path/2021-11-15/functions/${ProxyFunction.Arn}/response-streaming-invocations"
            ),
            "{path}: the streaming invocation URI, found {}",
            text(uri)
        );
    }
}

#[test]
fn admin_and_usage_routes_are_buffered_plain_invocations() {
    let template = template();
    for (path, function) in BUFFERED_PATHS {
        let integration = integration(&template, path);
        assert_eq!(text(at(integration, &["type"])), "aws_proxy", "{path}");
        assert!(
            get(integration, &["responseTransferMode"]).is_none_or(|m| text(m) == "BUFFERED"),
            "{path} is buffered"
        );
        assert!(
            text(at(integration, &["uri"])).ends_with(&format!(
                ":lambda:path/2015-03-31/functions/${{{function}.Arn}}/invocations"
            )),
            "{path} goes to {function}"
        );
    }
    // Every function may be invoked by this API, and only by it.
    for (function, _, _) in FUNCTIONS {
        let permission = template["Resources"]
            .as_mapping()
            .expect("Resources")
            .values()
            .find(|r| {
                text(at(r, &["Type"])) == "AWS::Lambda::Permission"
                    && text(at(r, &["Properties", "FunctionName"])) == function
            })
            .unwrap_or_else(|| panic!("no AWS::Lambda::Permission for {function}"));
        assert_eq!(
            text(at(permission, &["Properties", "Principal"])),
            "apigateway.amazonaws.com"
        );
        assert!(text(at(permission, &["Properties", "SourceArn"])).contains("${RelayApi}/"));
    }
}

#[test]
fn api_gateway_errors_come_in_anthropic_error_envelopes() {
    let template = template();
    let responses = at(
        &template,
        &[
            "Resources",
            "RelayApi",
            "Properties",
            "DefinitionBody",
            "x-amazon-apigateway-gateway-responses",
        ],
    );
    for (response, error_type) in [
        ("DEFAULT_4XX", "invalid_request_error"),
        ("DEFAULT_5XX", "api_error"),
        ("THROTTLED", "rate_limit_error"),
        ("REQUEST_TOO_LARGE", "request_too_large"),
    ] {
        let body = text(at(
            responses,
            &[response, "responseTemplates", "application/json"],
        ));
        // `$context.error.messageString` is a quoted JSON string.
        let body: serde_json::Value =
            serde_json::from_str(&body.replace("$context.error.messageString", "\"message\""))
                .unwrap_or_else(|e| panic!("{response}: {e}"));
        assert_eq!(
            body,
            serde_json::json!({"type": "error", "error": {"type": error_type, "message": "message"}}),
            "{response}"
        );
    }
}

#[test]
fn functions_are_arm64_al2023_cargo_lambda_builds_of_the_right_binary() {
    let template = template();
    for (function, binary, manifest) in FUNCTIONS {
        let function_resource = resource(&template, function);
        assert_eq!(
            text(at(function_resource, &["Type"])),
            "AWS::Serverless::Function"
        );
        assert_eq!(
            text(at(function_resource, &["Metadata", "BuildMethod"])),
            "rust-cargolambda",
            "{function}"
        );
        assert_eq!(
            text(at(
                function_resource,
                &["Metadata", "BuildProperties", "Binary"]
            )),
            binary,
            "{function}"
        );
        assert!(
            manifest.contains(&format!("name = \"{binary}\"")),
            "{binary} is the package (and binary) name in its Cargo.toml"
        );
        assert_eq!(text(at(function_resource, &["Properties", "CodeUri"])), ".");
        let property = |name| {
            function_property(&template, function, name)
                .unwrap_or_else(|| panic!("{function} has no {name}"))
        };
        assert_eq!(text(property("Runtime")), "provided.al2023", "{function}");
        assert_eq!(strings(property("Architectures")), ["arm64"], "{function}");
        assert_eq!(text(property("Handler")), "bootstrap", "{function}");
        assert_eq!(
            text(at(property("LoggingConfig"), &["LogFormat"])),
            "JSON",
            "{function}"
        );
        // Its own log group, with a retention.
        let group = at(property("LoggingConfig"), &["LogGroup"]);
        assert_eq!(tag_of(group).as_deref(), Some("Ref"));
        let group = resource(&template, text(group));
        assert_eq!(text(at(group, &["Type"])), "AWS::Logs::LogGroup");
        assert!(get(group, &["Properties", "RetentionInDays"]).is_some());
    }
    let timeout = function_property(&template, "ProxyFunction", "Timeout");
    assert_eq!(timeout.and_then(Value::as_u64), Some(900));
}

#[test]
fn functions_get_their_configuration_and_the_stage_stays_out_of_paths() {
    let template = template();
    for (function, _, _) in FUNCTIONS {
        let env = environment(&template, function);
        assert_eq!(
            env.get("AWS_LAMBDA_HTTP_IGNORE_STAGE_IN_PATH")
                .map(|v| text(v).to_owned())
                .as_deref(),
            Some("true"),
            "{function}: without it lambda_http puts /<stage> back in front of the path"
        );
        for name in ["TABLE_NAME", "RELAY_SECRET_ARN", "RUST_LOG"] {
            assert!(env.contains_key(name), "{function} needs {name}");
        }
        assert_eq!(
            tag_of(&env["TABLE_NAME"]).as_deref(),
            Some("Ref"),
            "{function}: TABLE_NAME is the table"
        );
        assert_eq!(text(&env["TABLE_NAME"]), "RelayTable");
        // Secrets come from Secrets Manager, never from the environment.
        for name in [
            "UPSTREAM_API_KEY",
            "ADMIN_PASSWORD",
            "ADMIN_PASSWORD_HASH",
            "SECRET_KEY",
        ] {
            assert!(!env.contains_key(name), "{function} must not get {name}");
        }
    }
    let proxy = environment(&template, "ProxyFunction");
    for (name, parameter) in [
        ("UPSTREAM_BASE_URL", "UpstreamBaseUrl"),
        ("LOG_RETENTION_DAYS", "UsageLogRetentionDays"),
    ] {
        assert_eq!(text(&proxy[name]), parameter, "{name}");
        assert!(get(&template, &["Parameters", parameter]).is_some());
    }
}

/// Budget alerts: a topic, the proxy told its ARN and allowed to publish
/// to it alone, e-mail and HTTPS webhook subscribers only when asked for,
/// and the ARN as an output for further subscribers.
#[test]
fn budget_alerts_go_to_their_own_topic_with_optional_email_and_webhook_subscribers() {
    let template = template();
    assert_eq!(
        text(at(&template, &["Resources", "BudgetAlertTopic", "Type"])),
        "AWS::SNS::Topic"
    );
    let proxy = environment(&template, "ProxyFunction");
    let arn = &proxy["BUDGET_ALERT_TOPIC_ARN"];
    assert!(is_ref(arn, "BudgetAlertTopic"), "{arn:?}");
    for function in ["AdminFunction", "UsageFunction"] {
        assert!(!environment(&template, function).contains_key("BUDGET_ALERT_TOPIC_ARN"));
    }
    let publishes: Vec<Statement> = statements(&template, "ProxyFunction")
        .into_iter()
        .filter(|s| s.actions.iter().any(|a| a.starts_with("sns:")))
        .collect();
    assert_eq!(publishes.len(), 1);
    assert_eq!(publishes[0].actions, ["sns:Publish"]);
    assert!(is_ref(&publishes[0].resource, "BudgetAlertTopic"));
    for (subscription, protocol, parameter, condition) in [
        (
            "BudgetAlertEmailSubscription",
            "email",
            "BudgetAlertEmail",
            "HasBudgetAlertEmail",
        ),
        (
            "BudgetAlertWebhookSubscription",
            "https",
            "BudgetAlertWebhookUrl",
            "HasBudgetAlertWebhook",
        ),
    ] {
        let resource = resource(&template, subscription);
        assert_eq!(text(at(resource, &["Condition"])), condition);
        let properties = at(resource, &["Properties"]);
        assert!(is_ref(at(properties, &["TopicArn"]), "BudgetAlertTopic"));
        assert_eq!(text(at(properties, &["Protocol"])), protocol);
        assert!(is_ref(at(properties, &["Endpoint"]), parameter));
        assert_eq!(
            text(at(&template, &["Parameters", parameter, "Default"])),
            "",
            "{parameter}: no subscriber unless asked for"
        );
        // The condition is "the parameter is not empty".
        let rendered = format!("{:?}", at(&template, &["Conditions", condition]));
        assert!(rendered.contains(parameter), "{condition}: {rendered}");
    }
    let webhook = text(at(
        &template,
        &["Parameters", "BudgetAlertWebhookUrl", "AllowedPattern"],
    ));
    assert!(
        webhook.contains("^https://"),
        "webhooks are HTTPS: {webhook}"
    );
    assert!(is_ref(
        outputs_value(&template, "BudgetAlertTopicArn"),
        "BudgetAlertTopic"
    ));
}

/// The parts of a `!Tag [a, b, …]` list, checking the tag.
fn tagged_list<'a>(value: &'a Value, tag: &str) -> &'a [Value] {
    assert_eq!(
        tag_of(value).as_deref(),
        Some(tag),
        "expected !{tag}: {value:?}"
    );
    untag(value)
        .as_sequence()
        .unwrap_or_else(|| panic!("!{tag} takes a list: {value:?}"))
}

/// Whether `value` is `!Ref <name>`.
fn is_ref(value: &Value, name: &str) -> bool {
    tag_of(value).as_deref() == Some("Ref") && text(value) == name
}

#[test]
fn admin_api_is_limited_to_admin_allowed_cidrs_by_the_function_and_the_resource_policy() {
    let template = template();
    // The parameter: a string whose empty default means no restriction.
    let parameter = at(&template, &["Parameters", "AdminAllowedCidrs"]);
    assert_eq!(text(at(parameter, &["Type"])), "String");
    assert_eq!(text(at(parameter, &["Default"])), "");
    assert!(
        text(at(parameter, &["AllowedPattern"])).starts_with("^$|"),
        "the empty default must pass the pattern"
    );
    let Some(Value::Sequence(groups)) = get(
        &template,
        &[
            "Metadata",
            "AWS::CloudFormation::Interface",
            "ParameterGroups",
        ],
    )
    .map(untag) else {
        panic!("no parameter groups");
    };
    assert!(
        groups
            .iter()
            .any(|g| strings(at(g, &["Parameters"])).contains(&"AdminAllowedCidrs".to_owned())),
        "AdminAllowedCidrs is in no parameter group"
    );
    // The admin function enforces it as ADMIN_ALLOWED_CIDRS.
    let admin = environment(&template, "AdminFunction");
    assert!(
        admin
            .get("ADMIN_ALLOWED_CIDRS")
            .is_some_and(|v| is_ref(v, "AdminAllowedCidrs")),
        "AdminFunction gets ADMIN_ALLOWED_CIDRS: !Ref AdminAllowedCidrs"
    );
    let condition = tagged_list(
        at(&template, &["Conditions", "HasAdminAllowedCidrs"]),
        "Not",
    );
    let equals = tagged_list(&condition[0], "Equals");
    assert!(is_ref(&equals[0], "AdminAllowedCidrs") && text(&equals[1]).is_empty());

    // API Gateway refuses outsiders on /admin and /admin/* before any
    // Lambda runs, and allows everything else.
    let statements = at(
        &template,
        &[
            "Resources",
            "RelayApi",
            "Properties",
            "Auth",
            "ResourcePolicy",
            "CustomStatements",
        ],
    );
    let Value::Sequence(statements) = untag(statements) else {
        panic!("CustomStatements is not a list");
    };
    let allow_all = statements.iter().any(|s| {
        get(s, &["Effect"]).is_some_and(|e| text(e) == "Allow")
            && text(at(s, &["Principal"])) == "*"
            && strings(at(s, &["Action"])) == ["execute-api:Invoke"]
            && strings(at(s, &["Resource"])) == ["execute-api:/*"]
            && get(s, &["Condition"]).is_none()
    });
    assert!(allow_all, "the policy must allow every other call");
    let conditional: Vec<&[Value]> = statements
        .iter()
        .filter(|s| tag_of(s).as_deref() == Some("If"))
        .map(|s| tagged_list(s, "If"))
        .collect();
    assert_eq!(
        conditional.len(),
        1,
        "one statement depends on the parameter"
    );
    let [condition, deny, otherwise] = conditional[0] else {
        panic!("!If takes three parts");
    };
    assert_eq!(text(condition), "HasAdminAllowedCidrs");
    assert!(
        is_ref(otherwise, "AWS::NoValue"),
        "no statement without a list"
    );
    assert_eq!(text(at(deny, &["Effect"])), "Deny");
    assert_eq!(text(at(deny, &["Principal"])), "*");
    assert_eq!(strings(at(deny, &["Action"])), ["execute-api:Invoke"]);
    // execute-api:/<stage>/<method>/<path>: every stage and method, the
    // admin paths only.
    assert_eq!(
        strings(at(deny, &["Resource"])),
        ["execute-api:/*/*/admin", "execute-api:/*/*/admin/*"]
    );
    let source_ips = at(deny, &["Condition", "NotIpAddress", "aws:SourceIp"]);
    let split = tagged_list(source_ips, "Split");
    assert_eq!(text(&split[0]), ",");
    assert!(is_ref(&split[1], "AdminAllowedCidrs"));
    // SAM resolves the parameter in Auth (not in DefinitionBody), so a new
    // list changes the deployment's hash and reaches the stage.
    assert!(
        get(
            &template,
            &[
                "Resources",
                "RelayApi",
                "Properties",
                "DefinitionBody",
                "x-amazon-apigateway-policy"
            ]
        )
        .is_none(),
        "the policy belongs in Auth.ResourcePolicy"
    );
}

#[test]
fn table_is_on_demand_with_ttl_and_point_in_time_recovery() {
    let template = template();
    let table = at(&template, &["Resources", "RelayTable", "Properties"]);
    assert_eq!(text(at(table, &["BillingMode"])), "PAY_PER_REQUEST");
    assert_eq!(
        text(at(table, &["TimeToLiveSpecification", "AttributeName"])),
        TTL_ATTRIBUTE
    );
    assert_eq!(
        at(table, &["TimeToLiveSpecification", "Enabled"]).as_bool(),
        Some(true)
    );
    assert_eq!(
        at(
            table,
            &[
                "PointInTimeRecoverySpecification",
                "PointInTimeRecoveryEnabled"
            ]
        )
        .as_bool(),
        Some(true)
    );
    let index = &at(table, &["GlobalSecondaryIndexes"])[0];
    assert_eq!(text(at(index, &["IndexName"])), GSI1);
    assert_eq!(
        text(at(
            &template,
            &["Resources", "RelayTable", "DeletionPolicy"]
        )),
        "Retain"
    );
}

#[test]
fn each_function_has_least_privilege() {
    let template = template();
    let dynamodb = |function| -> BTreeSet<String> {
        allowed_actions(&template, function)
            .into_iter()
            .filter(|a| a.starts_with("dynamodb:"))
            .collect()
    };
    for (function, _, _) in FUNCTIONS {
        for statement in statements(&template, function) {
            assert_eq!(statement.effect, "Allow");
            for action in &statement.actions {
                assert!(
                    !action.contains('*'),
                    "{function}: wildcard action {action}"
                );
            }
            // A list of resources, or one (possibly `!If`-chosen) resource.
            let resources = match &statement.resource {
                Value::Sequence(items) => items.clone(),
                _ => vec![statement.resource.clone()],
            };
            for resource in &resources {
                // !GetAtt RelayTable.Arn, !Sub "${RelayTable.Arn}/index/*",
                // or the secret (!If [CreateSecret, !Ref RelaySecret, …]).
                let rendered = format!("{resource:?}");
                assert!(
                    tag_of(resource).is_some(),
                    "{function}: a literal resource {rendered}"
                );
                let table = rendered.contains("RelayTable");
                let secret = rendered.contains("RelaySecret");
                let alerts = rendered.contains("BudgetAlertTopic");
                let bedrock = rendered.contains("BedrockModelArns");
                assert!(
                    table || secret || alerts || bedrock,
                    "{function}: resource {rendered}"
                );
                if statement.actions.iter().any(|a| a.starts_with("bedrock:")) {
                    assert!(
                        bedrock && function == "ProxyFunction",
                        "{function}: Bedrock only by the proxy, only on the models named"
                    );
                    assert_eq!(
                        statement.actions,
                        [
                            "bedrock:InvokeModel",
                            "bedrock:InvokeModelWithResponseStream",
                            "bedrock:CountTokens"
                        ]
                    );
                }
                if statement.actions.iter().any(|a| a.starts_with("sns:")) {
                    assert!(
                        alerts && function == "ProxyFunction",
                        "{function}: SNS only by the proxy, only on the budget-alert topic"
                    );
                    assert_eq!(statement.actions, ["sns:Publish"]);
                }
                if statement.actions.iter().any(|a| a.starts_with("dynamodb:")) {
                    assert!(table, "{function}: DynamoDB only on the relay table");
                }
                if statement
                    .actions
                    .iter()
                    .any(|a| a.starts_with("secretsmanager:"))
                {
                    assert!(secret, "{function}: Secrets Manager only on the secret");
                    assert_eq!(statement.actions, ["secretsmanager:GetSecretValue"]);
                }
            }
        }
        assert!(
            allowed_actions(&template, function).contains("secretsmanager:GetSecretValue"),
            "{function} reads the secret"
        );
    }

    let proxy = dynamodb("ProxyFunction");
    for needed in [
        "dynamodb:GetItem",
        "dynamodb:BatchGetItem",
        "dynamodb:Query",
        "dynamodb:UpdateItem",
        "dynamodb:PutItem",
        "dynamodb:DeleteItem",
        "dynamodb:DescribeTable",
    ] {
        assert!(proxy.contains(needed), "proxy needs {needed}");
    }
    for refused in ["dynamodb:BatchWriteItem", "dynamodb:Scan"] {
        assert!(!proxy.contains(refused), "proxy must not have {refused}");
    }
    // The proxy puts and deletes items only inside its transactions
    // (settlement, batch admission, ownership records).
    for statement in statements(&template, "ProxyFunction") {
        if statement
            .actions
            .iter()
            .any(|a| a == "dynamodb:PutItem" || a == "dynamodb:DeleteItem")
        {
            assert_eq!(
                statement.actions,
                ["dynamodb:PutItem", "dynamodb:DeleteItem"]
            );
            let condition = statement
                .condition
                .expect("PutItem and DeleteItem have a condition");
            assert_eq!(
                text(at(
                    &condition,
                    &["ForAnyValue:StringEquals", "dynamodb:EnclosingOperation"]
                )),
                "TransactWriteItems"
            );
        }
    }

    let admin = dynamodb("AdminFunction");
    for needed in [
        "dynamodb:GetItem",
        "dynamodb:PutItem",
        "dynamodb:UpdateItem",
        "dynamodb:DeleteItem",
        "dynamodb:Query",
        "dynamodb:BatchGetItem",
        "dynamodb:DescribeTable",
    ] {
        assert!(admin.contains(needed), "admin needs {needed}");
    }

    let usage = dynamodb("UsageFunction");
    assert_eq!(
        usage,
        BTreeSet::from(
            [
                "dynamodb:GetItem",
                "dynamodb:Query",
                "dynamodb:DescribeTable"
            ]
            .map(String::from)
        ),
        "usage only reads"
    );
}

fn looks_secret(value: &str) -> bool {
    [
        "sk-ant-",
        "sk-proxy-",
        "$2a$",
        "$2b$",
        "$2y$",
        "resolve:secretsmanager",
    ]
    .iter()
    .any(|marker| value.contains(marker))
}

#[test]
fn no_secret_in_parameter_defaults_outputs_or_the_template() {
    let template = template();
    let Some(Value::Mapping(parameters)) = get(&template, &["Parameters"]).map(untag) else {
        panic!("no Parameters");
    };
    for (name, parameter) in parameters {
        let name = text(name);
        let default = get(parameter, &["Default"])
            .map(|d| format!("{:?}", untag(d)))
            .unwrap_or_default();
        assert!(!looks_secret(&default), "{name} defaults to a secret");
        let lower = name.to_lowercase();
        if ["key", "password", "token"]
            .iter()
            .any(|w| lower.contains(w))
            || (lower.contains("secret") && !lower.ends_with("arn"))
        {
            panic!("parameter {name} would carry a secret: use the Secrets Manager secret");
        }
    }
    let Some(Value::Mapping(outputs)) = get(&template, &["Outputs"]).map(untag) else {
        panic!("no Outputs");
    };
    for (name, output) in outputs {
        let rendered = format!("{:?}", at(output, &["Value"]));
        assert!(!looks_secret(&rendered), "output {}", text(name));
        assert!(
            !rendered.contains("SecretString"),
            "output {} reads the secret's value",
            text(name)
        );
    }
    // The secret's ARN, never its value.
    assert_eq!(
        tag_of(outputs_value(&template, "SecretArn")).as_deref(),
        Some("If")
    );

    // The secret the stack creates starts with empty values, and only the
    // JWT key is generated.
    let generate = at(
        &template,
        &[
            "Resources",
            "RelaySecret",
            "Properties",
            "GenerateSecretString",
        ],
    );
    let initial: serde_json::Value =
        serde_json::from_str(text(at(generate, &["SecretStringTemplate"]))).expect("JSON");
    assert_eq!(
        initial,
        serde_json::json!({"upstream_api_key": "", "admin_password_hash": ""})
    );
    assert_eq!(text(at(generate, &["GenerateStringKey"])), "jwt_secret");
    for marker in ["sk-ant-", "$2a$", "$2b$", "$2y$"] {
        assert!(
            !TEMPLATE.contains(marker),
            "template.yaml contains {marker}…"
        );
    }
}

fn outputs_value<'a>(template: &'a Value, name: &str) -> &'a Value {
    at(template, &["Outputs", name, "Value"])
}

#[test]
fn outputs_give_claude_code_its_base_url() {
    let template = template();
    let line = outputs_value(&template, "AnthropicBaseUrl");
    assert_eq!(tag_of(line).as_deref(), Some("Sub"));
    assert_eq!(
        text(line),
        "export ANTHROPIC_BASE_URL=https://${RelayApi}.execute-api.${AWS::Region}.${AWS::URLSuffix}/${StageName}"
    );
    assert_eq!(
        text(outputs_value(&template, "ApiUrl")),
        "https://${RelayApi}.execute-api.${AWS::Region}.${AWS::URLSuffix}/${StageName}"
    );
    assert_eq!(
        text(outputs_value(&template, "DashboardName")),
        "RelayDashboard"
    );
}

/// `!Sub` resolved with placeholders: `${Name}` becomes `X`, `${!Literal}`
/// becomes `${Literal}`.
fn substitute(format: &str) -> String {
    let mut out = String::new();
    let mut rest = format;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        if let Some(literal) = after.strip_prefix('!') {
            out.push_str("${");
            rest = literal;
        } else {
            let end = after.find('}').expect("unclosed ${");
            out.push('X');
            rest = &after[end + 1..];
        }
    }
    out.push_str(rest);
    out
}

/// What the code emits: metric name → the dimension sets it is emitted under.
fn emitted_metrics() -> BTreeMap<String, Vec<Vec<String>>> {
    let record = UsageRecord {
        request_id: "relay_template_test".into(),
        key_id: PresentedKey::generate().id().clone(),
        at: now(),
        model: Some("claude-test-1".into()),
        requested_model: None,
        method: "POST".into(),
        path: "/v1/messages".into(),
        status: 200,
        stream: true,
        usage: TokenUsage::default(),
        estimated: false,
        latency_ms: 1,
        ttfb_ms: Some(1),
        retries: 0,
        client_ip: "203.0.113.7".into(),
        user_agent: None,
        session_id: None,
        attribution: Default::default(),
        error_type: None,
        upstream: None,
        cost: Default::default(),
        budget: Default::default(),
    };
    let document = request_document(DEFAULT_NAMESPACE, &record);
    let directive = &document["_aws"]["CloudWatchMetrics"][0];
    let dimension_sets: Vec<Vec<String>> =
        serde_json::from_value(directive["Dimensions"].clone()).expect("dimension sets");
    let mut metrics = BTreeMap::new();
    for metric in directive["Metrics"].as_array().expect("metrics") {
        let name = metric["Name"].as_str().expect("name").to_owned();
        metrics.insert(name, dimension_sets.clone());
    }
    // Counted events (`metrics::emit_event(function, metric, reason)`).
    for metric in [
        "Rejections",
        "AdminLogins",
        "SettleDelayed",
        "SettleFailures",
    ] {
        metrics.insert(
            metric.to_owned(),
            vec![vec!["Function".to_owned(), "Reason".to_owned()]],
        );
    }
    metrics
}

/// Whether the code calls `emit_event(function, metric, …)`.
fn emits_event(function: &str, metric: &str) -> bool {
    let call = format!("emit_event(\"{function}\",\"{metric}\"");
    EVENT_EMITTERS.iter().any(|source| {
        source
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect::<String>()
            .contains(&call)
    })
}

fn check_relay_metric(name: &str, dimensions: &BTreeMap<String, String>, emitted: &EmittedMap) {
    let sets = emitted
        .get(name)
        .unwrap_or_else(|| panic!("the code emits no metric {name}"));
    let names: Vec<String> = dimensions.keys().cloned().collect();
    assert!(
        sets.iter().any(|set| {
            let mut set = set.clone();
            set.sort();
            set == names
        }),
        "{name} is emitted under {sets:?}, not under {names:?}"
    );
    if let Some(function) = dimensions.get("Function")
        && dimensions.contains_key("Reason")
    {
        assert!(
            emits_event(function, name),
            "no emit_event(\"{function}\", \"{name}\", …) in the code"
        );
    } else {
        assert_eq!(
            dimensions.get("Function").map(String::as_str),
            Some("proxy"),
            "{name}"
        );
    }
}

type EmittedMap = BTreeMap<String, Vec<Vec<String>>>;

#[test]
fn dashboard_charts_the_metrics_the_code_emits() {
    let template = template();
    let body = at(
        &template,
        &["Resources", "RelayDashboard", "Properties", "DashboardBody"],
    );
    assert_eq!(tag_of(body).as_deref(), Some("Sub"));
    let dashboard: serde_json::Value =
        serde_json::from_str(&substitute(text(body))).expect("the dashboard body is JSON");
    let emitted = emitted_metrics();
    let mut charted = BTreeSet::new();
    for widget in dashboard["widgets"].as_array().expect("widgets") {
        let Some(lines) = widget["properties"]["metrics"].as_array() else {
            continue;
        };
        for line in lines {
            let line = line.as_array().expect("a metric line is a list");
            if let Some(expression) = line.first().and_then(|e| e["expression"].as_str()) {
                // SEARCH('{ClaudeRelay,Function,Model} MetricName="X" …')
                if let Some(schema) = expression
                    .strip_prefix("SEARCH('{")
                    .and_then(|s| s.split('}').next())
                {
                    let mut schema = schema.split(',');
                    if schema.next() == Some(DEFAULT_NAMESPACE) {
                        let name = expression
                            .split("MetricName=\"")
                            .nth(1)
                            .and_then(|s| s.split('"').next())
                            .expect("SEARCH names its metric");
                        let mut dimensions: BTreeMap<String, String> =
                            schema.map(|d| (d.to_owned(), String::new())).collect();
                        let function = expression
                            .split("Function=\"")
                            .nth(1)
                            .and_then(|s| s.split('"').next())
                            .expect("SEARCH names its function");
                        dimensions.insert("Function".into(), function.into());
                        check_relay_metric(name, &dimensions, &emitted);
                        charted.insert(name.to_owned());
                    }
                }
                continue;
            }
            let strings: Vec<&str> = line.iter().filter_map(|v| v.as_str()).collect();
            if strings.first() != Some(&DEFAULT_NAMESPACE) {
                continue;
            }
            let dimensions: BTreeMap<String, String> = strings[2..]
                .chunks(2)
                .map(|pair| (pair[0].to_owned(), pair[1].to_owned()))
                .collect();
            check_relay_metric(strings[1], &dimensions, &emitted);
            charted.insert(strings[1].to_owned());
        }
    }
    for required in [
        "Requests",
        "Errors",
        "ClientErrors",
        "UpstreamErrors",
        "Rejections",
        "Latency",
        "TimeToFirstByte",
        "InputTokens",
        "OutputTokens",
        "CacheCreationTokens",
        "CacheReadTokens",
        "UpstreamRetries",
    ] {
        assert!(charted.contains(required), "the dashboard lacks {required}");
    }
    // Quota and rate-limit rejections are charted by their reasons.
    let text = serde_json::to_string(&dashboard).expect("JSON");
    for reason in ["\"quota\"", "\"rate_limit\""] {
        assert!(text.contains(reason), "dashboard lacks Reason {reason}");
    }
}

#[test]
fn alarms_watch_errors_throttles_upstream_and_dynamodb() {
    let template = template();
    let emitted = emitted_metrics();
    let Some(Value::Mapping(resources)) = get(&template, &["Resources"]).map(untag) else {
        panic!("no Resources");
    };
    // (namespace, metric, dimension values) of every alarm's metrics.
    let mut watched: Vec<(String, String, Vec<String>)> = Vec::new();
    for (id, resource) in resources {
        if text(at(resource, &["Type"])) != "AWS::CloudWatch::Alarm" {
            continue;
        }
        let properties = at(resource, &["Properties"]);
        assert!(
            get(properties, &["AlarmActions"]).is_some(),
            "{} notifies no one",
            text(id)
        );
        let mut metrics = Vec::new();
        if let Some(name) = get(properties, &["MetricName"]) {
            metrics.push((
                text(at(properties, &["Namespace"])).to_owned(),
                text(name).to_owned(),
                get(properties, &["Dimensions"]).cloned(),
            ));
        }
        if let Some(Value::Sequence(queries)) = get(properties, &["Metrics"]).map(untag) {
            for query in queries {
                if let Some(metric) = get(query, &["MetricStat", "Metric"]) {
                    metrics.push((
                        text(at(metric, &["Namespace"])).to_owned(),
                        text(at(metric, &["MetricName"])).to_owned(),
                        get(metric, &["Dimensions"]).cloned(),
                    ));
                }
            }
        }
        for (namespace, name, dimensions) in metrics {
            let mut names = BTreeMap::new();
            let mut values = Vec::new();
            if let Some(Value::Sequence(dimensions)) = dimensions.as_ref().map(untag) {
                for dimension in dimensions {
                    let value = at(dimension, &["Value"]);
                    names.insert(
                        text(at(dimension, &["Name"])).to_owned(),
                        text(value).to_owned(),
                    );
                    values.push(text(value).to_owned());
                }
            }
            if namespace == DEFAULT_NAMESPACE {
                check_relay_metric(&name, &names, &emitted);
            }
            watched.push((namespace, name, values));
        }
    }
    let watches = |namespace: &str, name: &str, value: Option<&str>| {
        watched.iter().any(|(n, m, values)| {
            n == namespace && m == name && value.is_none_or(|v| values.iter().any(|x| x == v))
        })
    };
    for (function, _, _) in FUNCTIONS {
        for metric in ["Errors", "Throttles"] {
            assert!(
                watches("AWS/Lambda", metric, Some(function)),
                "no alarm on {function} {metric}"
            );
        }
    }
    assert!(watches(DEFAULT_NAMESPACE, "Errors", None), "proxy 5xx rate");
    assert!(watches(DEFAULT_NAMESPACE, "UpstreamErrors", None));
    assert!(watches("AWS/ApiGateway", "5XXError", None));
    assert!(watches(
        "AWS/DynamoDB",
        "WriteThrottleEvents",
        Some("RelayTable")
    ));
    assert!(watches(
        "AWS/DynamoDB",
        "ReadThrottleEvents",
        Some("RelayTable")
    ));
    assert!(watches("AWS/DynamoDB", "UserErrors", None));
}

#[test]
fn the_batch_collector_runs_on_a_schedule_with_the_event_the_proxy_trusts() {
    let template = template();
    let events = at(
        &template,
        &["Resources", "ProxyFunction", "Properties", "Events"],
    );
    let schedule = at(events, &["CollectBatches"]);
    assert_eq!(text(at(schedule, &["Type"])), "Schedule");
    assert_eq!(
        text(at(schedule, &["Properties", "Schedule"])),
        "rate(5 minutes)"
    );
    let input: serde_json::Value =
        serde_json::from_str(text(at(schedule, &["Properties", "Input"]))).unwrap();
    let file: serde_json::Value =
        serde_json::from_str(include_str!("../../../events/proxy-collect-batches.json")).unwrap();
    assert_eq!(
        input, file,
        "the schedule sends events/proxy-collect-batches.json"
    );
    assert_eq!(
        input["requestContext"]["stage"],
        relay_shared::lambda::SCHEDULE_STAGE
    );
    assert_eq!(input["path"], relay_shared::proxy::batches::COLLECT_PATH);
    // API Gateway could never send that stage: stage names have no `-`.
    let stage_pattern = text(at(
        &template,
        &["Parameters", "StageName", "AllowedPattern"],
    ));
    assert_eq!(stage_pattern, "^[A-Za-z0-9_]+$");
    assert!(relay_shared::lambda::SCHEDULE_STAGE.contains('-'));
    assert!(environment(&template, "ProxyFunction").contains_key("PASSTHROUGH_PATH_PREFIXES"));
}

#[test]
fn file_uploads_cross_api_gateway_as_binary() {
    let template = template();
    let types = strings(at(
        &template,
        &["Resources", "RelayApi", "Properties", "BinaryMediaTypes"],
    ));
    assert_eq!(types, ["multipart~1form-data"]);
}
