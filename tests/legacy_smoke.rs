mod support;

use serde_json::json;
use support::app::TestApp;

#[tokio::test]
async fn gm_and_player_chat_end_to_end() {
    let app = TestApp::spawn().await;
    app.create_gm(7, "Alice").await;
    app.add(7, 3, 1001).await;
    let (apply, remove) = app.relation(3).await;
    assert_eq!(apply, json!({"1001": ["7", "Alice"]}));
    assert_eq!(remove, json!([]));
    assert_eq!(app.gm_send(7, 1001, "hello").await.json(), json!({"res": 1}));
    assert_eq!(app.gs_receive(3).await, vec![("1001".to_owned(), vec!["hello".to_owned()])]);
    assert_eq!(app.gs_receive(3).await, vec![]);
    assert_eq!(app.gs_send(1001, "hi GM").await.json(), json!({"res": 1}));
    let inbox = app.gm_receive().await;
    assert_eq!(inbox["7"], vec![("1001".to_owned(), vec!["hi GM".to_owned()])]);
    assert!(app.gm_receive().await.is_empty());
}
