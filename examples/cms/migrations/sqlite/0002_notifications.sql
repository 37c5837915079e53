-- What the welcome mailer sent: one welcome per user, whichever process
-- handled the user's event (`handled_by`, its instance).
CREATE TABLE notifications (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id BIGINT NOT NULL,
    kind TEXT NOT NULL,
    handled_by TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    UNIQUE (user_id, kind)
);
