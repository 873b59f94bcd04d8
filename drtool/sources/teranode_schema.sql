-- Teranode's blockchain schema for PostgreSQL, as Teranode itself creates it at start
-- (there are no migration files: the store runs CREATE ... IF NOT EXISTS in Go code).
--
-- Source: github.com/bsv-blockchain/teranode
--   stores/blockchain/sql/sql.go, createPostgresSchemaUnlocked()
--     commit 837441c0f49f369cd95ecf3433c6c3e42da4ffe6   (tables state, blocks,
--     scheduled_blob_deletions; indexes; reverse_bytes helpers)
--   services/p2p/BanList.go, (*BanList).createTables()
--     commit 8f56463e3bd739f108e15d6d7a9c1052f47f692e   (table bans)
--
-- Encodings (stores/blockchain/sql/StoreBlock.go, commit 1603a009d3b11a8e72e781d3c344c52ae30bf9f9):
--   hash, previous_hash, merkle_root: 32 bytes in internal (little-endian) order, i.e. the
--     byte-reversed display hash; n_bits: the header's 4 bytes; block_time, nonce: header values.
--   chain_work: cumulative work, 32 bytes big-endian (so ORDER BY chain_work DESC works).
--   genesis: id 0, parent_id 0 (it references itself), height 0.
-- The best block (tip): WHERE invalid = false ORDER BY chain_work DESC, peer_id ASC, id ASC LIMIT 1.
-- Teranode also runs ALTER TABLE blocks ALTER COLUMN peer_id TYPE TEXT and adds the newer
-- columns (processed_at, persisted_at, median_time_past, coinbase_bump, on_main_chain) to
-- older tables; here they are part of CREATE TABLE.

CREATE TABLE IF NOT EXISTS state (
    key            VARCHAR(32) PRIMARY KEY
    ,data          BYTEA NOT NULL
    ,inserted_at   TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP
    ,updated_at    TIMESTAMPTZ NULL
);

CREATE TABLE IF NOT EXISTS blocks (
    id              BIGSERIAL PRIMARY KEY
    ,parent_id      BIGSERIAL REFERENCES blocks(id)
    ,version        INTEGER NOT NULL
    ,hash           BYTEA NOT NULL
    ,previous_hash  BYTEA NOT NULL
    ,merkle_root    BYTEA NOT NULL
    ,block_time     BIGINT NOT NULL
    ,n_bits         BYTEA NOT NULL
    ,nonce          BIGINT NOT NULL
    ,height         BIGINT NOT NULL
    ,chain_work     BYTEA NOT NULL
    ,tx_count       BIGINT NOT NULL
    ,size_in_bytes  BIGINT NOT NULL
    ,subtree_count  BIGINT NOT NULL
    ,subtrees       BYTEA NOT NULL
    ,coinbase_tx    BYTEA NOT NULL
    ,invalid        BOOLEAN NOT NULL DEFAULT FALSE
    ,mined_set      BOOLEAN NOT NULL DEFAULT FALSE
    ,subtrees_set   BOOLEAN NOT NULL DEFAULT FALSE
    ,peer_id        TEXT NOT NULL
    ,inserted_at    TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP
    ,processed_at   TIMESTAMPTZ NULL
    ,persisted_at   TIMESTAMPTZ NULL
    ,median_time_past BIGINT NOT NULL DEFAULT 0
    ,coinbase_bump  BYTEA NULL
    ,on_main_chain  BOOLEAN NOT NULL DEFAULT FALSE
);

CREATE UNIQUE INDEX IF NOT EXISTS ux_blocks_hash ON blocks (hash);
CREATE INDEX IF NOT EXISTS idx_chain_work_peer_id ON blocks (chain_work DESC, peer_id ASC, id ASC);
CREATE INDEX IF NOT EXISTS idx_chain_work_valid ON blocks (chain_work DESC, peer_id ASC, id ASC) WHERE invalid = false;
CREATE INDEX IF NOT EXISTS idx_subtrees_mined_height ON blocks (height ASC) WHERE subtrees_set = true AND mined_set = false;
CREATE INDEX IF NOT EXISTS idx_subtrees_set_height ON blocks (height ASC) WHERE subtrees_set = false;
CREATE INDEX IF NOT EXISTS idx_not_persisted_height ON blocks (height ASC) WHERE persisted_at IS NULL AND invalid = false;
CREATE INDEX IF NOT EXISTS idx_height ON blocks (height);
CREATE INDEX IF NOT EXISTS idx_parent_id ON blocks (parent_id);
CREATE INDEX IF NOT EXISTS idx_inserted_at ON blocks (inserted_at);
CREATE INDEX IF NOT EXISTS idx_invalid_height ON blocks (height DESC) WHERE invalid = true;
CREATE INDEX IF NOT EXISTS idx_on_main_chain_height ON blocks (height ASC) WHERE on_main_chain = true;

CREATE OR REPLACE FUNCTION reverse_bytes_iter(bytes bytea, length int, midpoint int, index int)
RETURNS bytea AS
$$
  SELECT CASE WHEN index >= midpoint THEN bytes ELSE
    reverse_bytes_iter(
      set_byte(
        set_byte(bytes, index, get_byte(bytes, length-index)),
        length-index, get_byte(bytes, index)
      ),
      length, midpoint, index + 1
    )
  END;
$$ LANGUAGE SQL IMMUTABLE;

CREATE OR REPLACE FUNCTION reverse_bytes(bytes bytea) RETURNS bytea AS
'SELECT reverse_bytes_iter(bytes, octet_length(bytes)-1, octet_length(bytes)/2, 0)'
LANGUAGE SQL IMMUTABLE;

CREATE TABLE IF NOT EXISTS scheduled_blob_deletions (
    id                BIGSERIAL PRIMARY KEY,
    blob_key          BYTEA NOT NULL,
    file_type         VARCHAR(32) NOT NULL,
    store_type        SMALLINT NOT NULL,
    delete_at_height  BIGINT NOT NULL,
    retry_count       INT DEFAULT 0,
    last_retry_at     TIMESTAMPTZ
);

CREATE UNIQUE INDEX IF NOT EXISTS ux_scheduled_blob_deletions_blob ON scheduled_blob_deletions(blob_key, file_type, store_type);
CREATE INDEX IF NOT EXISTS idx_scheduled_blob_deletions_height ON scheduled_blob_deletions(delete_at_height ASC, id ASC);

CREATE TABLE IF NOT EXISTS bans (
    key TEXT PRIMARY KEY,
    expiration_time TIMESTAMP WITH TIME ZONE,
    subnet TEXT
);
