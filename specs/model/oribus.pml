/*
 * oribus commit protocol: a Promela model, checked exhaustively with SPIN.
 *
 * specs/PROTOCOL.md is the prose; section and invariant numbers (§n, I-n) refer to it.
 * specs/model/check.py builds and runs this model and its broken variants.
 *
 * What is modelled
 *   shards     a versioned store, a delivery log, write intents and read locks, an epoch,
 *              and one record per transaction, both in memory (vol) and in the fsynced
 *              prefix of the WAL (dur);
 *   sessions   read (each read recorded as a delivery; a read of a key under a write
 *              intent waits), then commit: one phase on a single shard; with one writer
 *              and read-only participants, validations that take read leases (in memory,
 *              no record) and then one phase on the writer with a deadline (§5.8); or
 *              two phases among writers with the decision recorded by compare-and-set on
 *              the primary (in configuration RO_2PC with a read-only participant too,
 *              validated among the prepares, its deadline checked by that compare-and-set,
 *              its lease released after the decision); the session process is also the
 *              bus that coordinates its commit, and may crash; YES votes carry the new
 *              versions, a finish may be lost, and the answer names the new versions the
 *              coordinator learned;
 *   environment  the recovery sweep (and readers tired of waiting), which may resolve any
 *              prepared transaction through its primary at any moment ("anyone may abort
 *              through the primary"); background WAL flushes; shard crashes (memory,
 *              delivery log and leases lost, new epoch, recovery from the durable log, a
 *              restart grace refusing new write intents); time passing a deadline, after
 *              which leases end on their own and restart graces may end.
 * Values are abstracted to versions.
 *
 * Time, abstractly. §5.8 proves three orderings from the clock assumption: a commit point
 * that honours a deadline comes before it (in real time), a lease ends on its own only
 * after it, and a restart grace ends only after the deadline of every lease the shard
 * granted before it started. The model keeps exactly those: the ghost mask `late` says
 * whose deadline has passed; the environment may set it at any moment while something
 * still depends on it; a commit point refuses once it is set; lease expiry and the end of
 * a grace are enabled only after it. Everything else about clocks is abstracted away.
 *
 * Configuration (the default one): 3 sessions, 2 shards, 3 keys, MAXCRASH crashes (default
 * 1), shared by the shards, the coordinators of A and B, and lost finishes:
 *
 *   keys        K0 -> S0,   K1 -> S1,   K2 -> S1
 *   A (txn 0)   reads K0, K2 (S0 first)   writes K0, K2   2PC among writers, primary S0
 *   B (txn 1)   reads K1, K0 (S1 first)   writes K2       one writer (S1); S0 read-only:
 *                                                          a lease on K0, then 1PC on S1
 *   C (txn 2)   reads K2                  writes K1       1PC on S1
 *
 * A's writes span both shards (a partial commit would show); A and B are a write skew
 * across shards (A reads K2 and writes K0, B reads K0 — on its read-only participant, held
 * only by a lease — and writes K2); B and C are a write skew on S1; A and B write the same
 * key; A, B and C all contend for S1.
 *
 * Configuration RO_2PC (-DRO_2PC at spin -a; check.py runs it as a second configuration):
 * two phases among several writers WITH a read-only participant. A third shard S2 holds K3,
 * which A only reads and B writes:
 *
 *   keys        K0 -> S0,   K1 -> S1,   K2 -> S1,   K3 -> S2
 *   A (txn 0)   reads K0, K2, K3 (S0, S1, S2)   writes K0, K2   2PC among the writers S0
 *                                                               and S1, primary S0; S2
 *                                                               read-only: a lease on K3
 *   B (txn 1)   reads K3                        writes K3       1PC on S2
 *   C (txn 2)   reads K2                        writes K1       1PC on S1 (as above)
 *
 * The bus sends A's prepares and its validation on S2 at once, so they land in any of the
 * six orders; the primary's compare-and-set refuses A's commit once A's deadline has
 * passed (§5.4, §5.8 rule 3); the lease is released once the outcome is known, or runs out
 * when the bus dies first; S2 may crash after granting it (the lease is lost, S2 gets a new
 * epoch and a restart grace). B writing K3 after A read it is the stale read the lease,
 * the deadline and S2's grace must keep from A's commit point. Here A is the only
 * transaction with a lease, so a counterexample to I-8 is one through this shape.
 *
 * Deliberately broken variants, each of which must yield a counterexample (-D at spin -a;
 * specs/model/broken_*.pml define one each and include this file):
 *   BROKEN_SKIP_VALIDATION  prepare and one-phase commit skip the ORI version check
 *   BROKEN_NO_CAS           the primary's decide overwrites ABORTED with COMMITTED
 *   BROKEN_EARLY_ACK        the primary applies and answers COMMITTED before its
 *                           decision record is fsynced
 *   BROKEN_NO_EPOCH         a participant ignores the session's epoch, so a restarted
 *                           shard validates against its now empty delivery log
 *   BROKEN_READ_THROUGH     reads do not wait for write intents
 *   BROKEN_PARTIAL_ACK      YES votes carry no versions: the answer names the primary's
 *                           new versions and those of the finishes that were answered
 *   BROKEN_NO_RESTART_GRACE a restarted shard takes new write intents at once, though it
 *                           lost the read leases it had granted
 *   BROKEN_NO_DEADLINE      the commit point ignores the deadline of the read leases
 *   BROKEN_EARLY_RELEASE    the coordinator releases the read leases before the commit
 *                           point (once the validations, or phase one, are done) instead
 *                           of once the outcome is known
 */

#ifndef MAXCRASH
#define MAXCRASH 1
#endif

#ifdef ONLY_LTL
/* the model's own assertions off: a run can then fail only through its ltl property */
#define assert(e) skip
#endif

#ifndef RO_2PC
#define NS 2            /* shards */
#define NK 3            /* keys */
#else
#define NS 3            /* shards: S2 holds K3, which A only reads and B writes */
#define NK 4            /* keys */
#endif
#define NT 3            /* transactions = sessions (one commit attempt each) */

/* a shard's record of a transaction (oribus/shards/txn.py) */
#define NONE      0
#define PREPARED  1
#define COMMITTED 2
#define ABORTED   3

/* votes of phase one, and answers of a one-phase commit (besides COMMITTED) */
#define YES       11
#define NO        12    /* a conflict: stale read or lock held (a 1PC answers Conflict) */
#define EXPIRED   13    /* SessionExpired: the token's epoch is not the shard's */
#define NOTHING   14    /* a non-primary with nothing to write or lock: out of phase two */
#define GRACE     15    /* Unavailable: the shard is in its restart grace (a new write intent) */
#define LATE      16    /* Aborted: the commit point is past the deadline of the leases */

/* Protocol events are printed as "EV ..." lines when a trail is replayed (pan -r); check.py
   spells out the {state:n} and {vote:n} codes. A search executes no printf. */

#ifndef RO_2PC
#define SHARD(k)    ((k) == 0 -> 0 : 1)
#define RMASK(t)    ((t) == 0 -> 5 : ((t) == 1 -> 3 : 4))    /* keys read:    bit k = Kk */
#define WMASK(t)    ((t) == 0 -> 5 : ((t) == 1 -> 4 : 2))    /* keys written: bit k = Kk */
#define WSHARDS(t)  ((t) == 0 -> 3 : 2)                      /* its writers, as a shard mask */
#define FIRST(t)    ((t) == 0 -> 0 : 1)                      /* the shard read first */
#define KEYS_ON(s)  ((s) == 0 -> 1 : 6)                      /* keys of a shard, as a mask */
#else
#define SHARD(k)    ((k) == 0 -> 0 : ((k) == 3 -> 2 : 1))
#define RMASK(t)    ((t) == 0 -> 13 : ((t) == 1 -> 8 : 4))   /* keys read:    bit k = Kk */
#define WMASK(t)    ((t) == 0 -> 5 : ((t) == 1 -> 8 : 2))    /* keys written: bit k = Kk */
#define WSHARDS(t)  ((t) == 0 -> 3 : ((t) == 1 -> 4 : 2))    /* its writers, as a shard mask */
#define KEYS_ON(s)  ((s) == 0 -> 1 : ((s) == 1 -> 6 : 8))    /* keys of a shard, as a mask */
#endif
#define BIT(m, k)   (((m) >> (k)) & 1)
/* the primary: the shard of the smallest written key */
#define PRIMARY(t)  (BIT(WMASK(t), 0) -> SHARD(0) : (BIT(WMASK(t), 1) -> SHARD(1) : \
                     (BIT(WMASK(t), 2) -> SHARD(2) : SHARD(3))))
/* the same, spelled without ?: expressions, which an ltl formula would read as implications */
#define PRIMARY_0   0
#ifndef RO_2PC
#define PRIMARY_1   1
#else
#define PRIMARY_1   2
#endif
#define PRIMARY_2   1
/* a single writer: its writers' shard mask has one bit */
#define ONE_WRITER(t) ((WSHARDS(t) & (WSHARDS(t) - 1)) == 0)

#define AT(s, t)    ((s) * NT + (t))    /* a shard's record of a transaction */
#define KT(t, k)    ((t) * NK + (k))    /* a (transaction, key) pair */
#define TS(t, s)    ((t) * NS + (s))    /* a (session, shard) pair */

/* ---- shards ------------------------------------------------------------------------ */
byte ver[NK];           /* current version per key (memory; rebuilt from the WAL) */
byte wl[NK];            /* write intent: holder txn + 1, 0 = none */
byte rl[NK];            /* read locks: bitmask of holder txns */
byte vol[NS * NT];      /* a shard's record of a txn, in memory */
byte dur[NS * NT];      /* the same record in the fsynced prefix of the WAL */
byte tver[NT * NK];     /* version a txn writes to a key (its PREPARE / 1PC record) */
byte prl[NT];           /* keys a txn read-locks (its PREPARE record) */
byte epoch[NS];         /* new on every start of a shard */
byte ls[NS];            /* read leases a shard holds, in memory only: bitmask of txns */
bit grace[NS];          /* the shard restarted and takes no new write intent yet (§5.8) */
/*
 * Delivery log: version + 1 delivered to a session, 0 = none. A shard keeps it in memory
 * only: an entry counts on shard s only while s is still in the epoch the session's
 * token names (each session reads each shard once, so that is the epoch of the read).
 * The same array is the ghost record of what the session actually read.
 */
byte dlog[NT * NK];
#define LOGGED(t, k) (tok[TS(t, SHARD(k))] == epoch[SHARD(k)] + 1 && dlog[KT(t, k)] != 0)
/* ---- sessions ---------------------------------------------------------------------- */
byte tok[NT * NS];      /* the first token (epoch + 1) a session got from a shard */
byte crashes;           /* crashes so far, of shards and coordinators */
byte sessions_done;
/* ---- time: whose deadlines have passed (see "Time, abstractly" above) ------------------ */
byte late;              /* bitmask of txns whose deadline D (less the skew bound) has passed */
byte infl;              /* txns holding a deadline whose commit point is still to come */
byte gwait[NS];         /* the txns whose leases shard s granted before its last start */
/* ---- ghosts: they observe and never steer --------------------------------------------- */
byte cver[NK];          /* version written by the last txn whose commit point passed */
bit committed[NT];      /* the commit point passed: COMMITTED recorded (1PC or primary) */
bit aborted[NT];        /* the primary recorded ABORTED */
bit acked[NT];          /* the session was told its commit succeeded */
bit partial_ack;        /* some acknowledged commit's answer lacked, or misstated, the new
                           version of a key it wrote (I-7) */
bit stale_commit;       /* some commit point passed with a stale read (I-1 broken) */
bit partial_read;       /* some read saw part of a commit, or an uncommitted write (I-2) */

/* ---- invariants: asserted by Monitor in every state, and stated in LTL --------------- */
/* I-1 is asserted at each commit point (commit_point), I-2 also at each read
   (read_shard); the ghost bits stale_commit and partial_read carry those to LTL */
/* I-4: no transaction is both committed and aborted */
#define NOT_BOTH(t)       (!(committed[t] && aborted[t]))
/* I-3: an acknowledged commit's COMMITTED record is in its primary's durable log */
#define ACK_DURABLE(t, p) (!acked[t] || (committed[t] && dur[AT(p, t)] == COMMITTED))
/* I-2: a key not under a write intent shows exactly its last committed version */
#define VISIBLE(k)        (wl[k] != 0 || ver[k] == cver[k])
#define INV_NOT_BOTH      (NOT_BOTH(0) && NOT_BOTH(1) && NOT_BOTH(2))
#define INV_ACK_DURABLE   (ACK_DURABLE(0, PRIMARY_0) && ACK_DURABLE(1, PRIMARY_1) && \
                           ACK_DURABLE(2, PRIMARY_2))
#ifndef RO_2PC
#define INV_VISIBLE       (VISIBLE(0) && VISIBLE(1) && VISIBLE(2))
#else
#define INV_VISIBLE       (VISIBLE(0) && VISIBLE(1) && VISIBLE(2) && VISIBLE(3))
#endif

ltl no_stale_read_at_commit        { [] !stale_commit }
ltl not_both_committed_and_aborted { [] INV_NOT_BOTH }
ltl acknowledged_is_durable        { [] INV_ACK_DURABLE }
ltl all_or_nothing_visibility      { [] (INV_VISIBLE && !partial_read) }
ltl acknowledged_names_its_versions { [] !partial_ack }

/*
 * fsync on shard s: every record appended so far becomes durable. Read locks of a
 * durably resolved transaction, and the writes of a durably aborted one, are never
 * needed again on s; clearing them keeps equal futures equal states.
 */
inline fsync(s) {
    for (i : 0 .. NT - 1) {
        dur[AT(s, i)] = vol[AT(s, i)];
        if
        :: dur[AT(s, i)] == COMMITTED || dur[AT(s, i)] == ABORTED ->
            for (u : 0 .. NK - 1) {
                if
                :: SHARD(u) == s ->
                    prl[i] = prl[i] & ~(1 << u);
                    if
                    :: dur[AT(s, i)] == ABORTED -> tver[KT(i, u)] = 0
                    :: else -> skip
                    fi
                :: else -> skip
                fi
            }
        :: else -> skip
        fi
    }
    u = 0
}

/*
 * Once every crash has happened nothing can tell whether a record is durable, so it is
 * flushed at once: that merges states which differ only in unobservable flush timing.
 */
inline quiet_flush(s) {
    if
    :: crashes >= MAXCRASH -> fsync(s)
    :: else -> skip
    fi
}

#ifndef RO_2PC
#define QUIET_FLUSH_ALL quiet_flush(0); quiet_flush(1)
#else
#define QUIET_FLUSH_ALL quiet_flush(0); quiet_flush(1); quiet_flush(2)
#endif

/* I-1: at a commit point every key the session read still has the version it read */
inline commit_point(t) {
    printf("EV %c: commit point: every read is checked against the committed versions\n", 'A' + t);
    for (i : 0 .. NK - 1) {
        if
        :: BIT(RMASK(t), i) && dlog[KT(t, i)] != 0 && dlog[KT(t, i)] - 1 != cver[i] ->
            stale_commit = 1
        :: else -> skip
        fi
    }
    assert(!stale_commit);
    committed[t] = 1;
    for (i : 0 .. NK - 1) {
        if
        :: BIT(WMASK(t), i) -> cver[i] = tver[KT(t, i)]
        :: else -> skip
        fi
    }
}

inline unlock(t, s) {
    for (i : 0 .. NK - 1) {
        if
        :: SHARD(i) == s ->
            rl[i] = rl[i] & ~(1 << t);
            if
            :: wl[i] == t + 1 -> wl[i] = 0
            :: else -> skip
            fi
        :: else -> skip
        fi
    }
}

/* make t's writes on shard s visible and release its locks there */
inline apply_and_unlock(t, s) {
    for (i : 0 .. NK - 1) {
        if
        :: SHARD(i) == s && BIT(WMASK(t), i) -> ver[i] = tver[KT(t, i)]
        :: else -> skip
        fi
    }
    unlock(t, s)
}

/*
 * The coordinator learns the new versions of t's writes on shard s, as a vote, a decision
 * or a finish reply carries them: the versions t's PREPARE (or one-phase) record fixed.
 */
inline report_versions(t, s) {
    for (i : 0 .. NK - 1) {
        if
        :: SHARD(i) == s && BIT(WMASK(t), i) -> known[i] = tver[KT(t, i)]
        :: else -> skip
        fi
    }
}

/*
 * The answer to a commit whose decision is COMMITTED (§5.5, §5.7): it names the new version
 * of every key t wrote, or, when one is not known, the client gets Unavailable (the commit
 * stands; a retry with the same id learns them). I-7, at the moment of the answer: every
 * version named is the one t's record installs (what apply_and_unlock and a restart's replay
 * make current). The Unavailable branch is not reachable here (a YES vote always reports;
 * it is the retry of §5.7, which the model does not make), so the check has teeth only in
 * broken_partial_ack.pml.
 */
inline acknowledge(t) {
    ok = 1;
#ifndef BROKEN_PARTIAL_ACK
    for (i : 0 .. NK - 1) {
        if
        :: BIT(WMASK(t), i) && known[i] == 0 -> ok = 0
        :: else -> skip
        fi
    }
#endif
    if
    :: ok ->
        acked[t] = 1;
#ifndef RO_2PC
        printf("EV %c: the client is told: committed, with versions K0:%d K1:%d K2:%d\n",
               'A' + t, known[0], known[1], known[2]);
#else
        printf("EV %c: the client is told: committed, with versions K0:%d K1:%d K2:%d K3:%d\n",
               'A' + t, known[0], known[1], known[2], known[3]);
#endif
        for (i : 0 .. NK - 1) {
            if
            :: BIT(WMASK(t), i) && known[i] != tver[KT(t, i)] -> partial_ack = 1
            :: else -> skip
            fi
        }
        assert(!partial_ack)
    :: else ->
        printf("EV %c: the client is told: Unavailable, committed without every new version\n", 'A' + t)
    fi;
    ok = 0
}

/* a new write intent of t on s is refused during s's restart grace (§5.8) */
#define IN_GRACE(t, s) (grace[s] && (WMASK(t) & KEYS_ON(s)) != 0)
/* the commit point refuses a commit whose deadline has passed (§5.8) */
#ifdef BROKEN_NO_DEADLINE
#define PAST_DEADLINE(t) 0
#else
#define PAST_DEADLINE(t) BIT(late, t)
#endif

#ifdef BROKEN_NO_EPOCH
#define TOKEN_OK(t, s) 1
#else
#define TOKEN_OK(t, s) (tok[TS(t, s)] == 0 || tok[TS(t, s)] == epoch[s] + 1)
#endif

/*
 * The ORI rule for t's part on shard s (§2): every logged delivery still current; no key
 * written or read under another txn's write intent; no written key under another txn's
 * read lock (no-wait). Sets ok.
 */
inline validate(t, s) {
    ok = 1;
    for (i : 0 .. NK - 1) {
        if
        :: SHARD(i) == s ->
#ifndef BROKEN_SKIP_VALIDATION
            if
            :: LOGGED(t, i) && dlog[KT(t, i)] - 1 != ver[i] -> ok = 0
            :: else -> skip
            fi;
#endif
            if
            :: (BIT(WMASK(t), i) || LOGGED(t, i)) && wl[i] != 0 && wl[i] != t + 1 -> ok = 0
            :: else -> skip
            fi;
            if
            :: BIT(WMASK(t), i) && (rl[i] & ~(1 << t)) != 0 -> ok = 0
            :: else -> skip
            fi
        :: else -> skip
        fi
    }
}

/*
 * A read-only participant s validates t (§5.8): the token, the ORI rule, then read locks on
 * what it validated, held in memory as a lease (no record, no fsync) — or NOTHING to hold.
 * A refusal clears commit; a lease granted sets lease (the commit gets a deadline).
 */
inline validate_ro_body(t, s) {
        if
        :: !TOKEN_OK(t, s) -> commit = 0; vote = EXPIRED
        :: else ->
            validate(t, s);
            if
            :: !ok -> commit = 0; vote = NO
            :: else ->
                has = 0;
                for (i : 0 .. NK - 1) {
                    if
                    :: SHARD(i) == s && LOGGED(t, i) -> has = 1; rl[i] = rl[i] | (1 << t)
                    :: else -> skip
                    fi
                }
                if
                :: has -> ls[s] = ls[s] | (1 << t); infl = infl | (1 << t); lease = 1; vote = YES
                :: else -> vote = NOTHING
                fi
            fi
        fi;
        printf("EV %c: validate on S%d (read-only): {vote:%d}\n", 'A' + t, s, vote);
        i = 0; has = 0; ok = 0; vote = 0
}

inline validate_ro(t, s) {
    d_step { validate_ro_body(t, s) }
}

/* t's leases on the read-only participants in ro end (released, or run out) */
inline end_leases(t, ro) {
    for (u : 0 .. NS - 1) {
        if
        :: BIT(ro, u) && BIT(ls[u], t) -> ls[u] = ls[u] & ~(1 << t); unlock(t, u)
        :: else -> skip
        fi
    }
    u = 0
}

/*
 * A read of t's keys on shard s (§4): waits while any of them is under a write intent,
 * then returns the current versions and records them as deliveries; the first token
 * from s is kept. Checks I-2 as a reader sees it.
 */
#define WAITS(t, s, k) (SHARD(k) == s && BIT(RMASK(t), k) && wl[k] != 0)
inline read_shard(t, s) {
    d_step {
#ifndef BROKEN_READ_THROUGH
        !(WAITS(t, s, 0) || WAITS(t, s, 1) || WAITS(t, s, 2)
#ifdef RO_2PC
          || WAITS(t, s, 3)
#endif
        );
#endif
        for (i : 0 .. NK - 1) {
            if
            :: SHARD(i) == s && BIT(RMASK(t), i) ->
                printf("EV %c: reads K%d at version %d\n", 'A' + t, i, ver[i]);
                /* I-2a: a read returns exactly the last committed version */
                if
                :: ver[i] != cver[i] -> partial_read = 1
                :: else -> skip
                fi;
                /* I-2b: a transaction seen in an earlier read is seen in this one too */
                for (u : 0 .. NT - 1) {
                    if
                    :: BIT(seen, u) && BIT(WMASK(u), i) && ver[i] < tver[KT(u, i)] -> partial_read = 1
                    :: else -> skip
                    fi
                }
                assert(!partial_read);
                for (u : 0 .. NT - 1) {
                    if
                    :: committed[u] && BIT(WMASK(u), i) && tver[KT(u, i)] <= ver[i] ->
                        seen = seen | (1 << u)
                    :: else -> skip
                    fi
                }
                dlog[KT(t, i)] = ver[i] + 1
            :: else -> skip
            fi
        }
        if
        :: tok[TS(t, s)] == 0 && (RMASK(t) & KEYS_ON(s)) != 0 -> tok[TS(t, s)] = epoch[s] + 1
        :: else -> skip
        fi;
        i = 0; u = 0
    }
}

/*
 * Phase one on shard s (§5.3): a known transaction answers from its record (a tombstone
 * votes NO); otherwise check the token, validate, lock, append PREPARE and fsync, vote.
 * A NO (or SessionExpired) clears commit; a NOTHING vote (a non-primary with nothing to
 * write or lock) takes s out of phase two.
 */
inline prepare_body(t, s) {
        if
        :: vol[AT(s, t)] == PREPARED || vol[AT(s, t)] == COMMITTED ->
            vote = YES;
#ifndef BROKEN_PARTIAL_ACK
            report_versions(t, s)
#else
            skip
#endif
        :: vol[AT(s, t)] == ABORTED -> commit = 0; vote = NO
        :: else ->
            if
            :: !TOKEN_OK(t, s) -> commit = 0; vote = EXPIRED
            :: IN_GRACE(t, s) -> commit = 0; vote = GRACE
            :: else ->
                validate(t, s);
                if
                :: !ok -> commit = 0; vote = NO
                :: else ->
                    has = 0;
                    for (i : 0 .. NK - 1) {
                        if
                        :: SHARD(i) == s && BIT(WMASK(t), i) ->
                            has = 1; wl[i] = t + 1; tver[KT(t, i)] = ver[i] + 1
                        :: SHARD(i) == s && !BIT(WMASK(t), i) && LOGGED(t, i) ->
                            has = 1; rl[i] = rl[i] | (1 << t); prl[t] = prl[t] | (1 << i)
                        :: else -> skip
                        fi
                    }
                    if
                    :: !has && s != PRIMARY(t) -> parts = parts & ~(1 << s); vote = NOTHING
                    :: else ->
                        vol[AT(s, t)] = PREPARED; fsync(s); vote = YES;
                        /* a YES vote carries the new versions its write intents fix */
#ifndef BROKEN_PARTIAL_ACK
                        report_versions(t, s)
#else
                        skip
#endif
                    fi
                fi
            fi
        fi;
        printf("EV %c: prepare on S%d: votes {vote:%d}\n", 'A' + t, s, vote);
        i = 0; has = 0; ok = 0; vote = 0
}

inline prepare(t, s) {
    d_step { prepare_body(t, s) }
}

/*
 * The decision on the primary p: compare-and-set PREPARED -> COMMITTED, anything else ->
 * ABORTED (a tombstone if p never prepared t), fsynced. This record is the commit point
 * (§5.4). A commit whose read leases' deadline has passed (past: the commit has a deadline
 * and PAST_DEADLINE holds) is refused and recorded ABORTED (§5.8 rule 3). out is t's state
 * on p afterwards.
 */
inline decide_body(t, p, commit, past, out) {
    if
#ifdef BROKEN_NO_CAS
    /* the outcome is written without comparing: a late commit overwrites an abort */
    :: commit && vol[AT(p, t)] == ABORTED ->
        vol[AT(p, t)] = COMMITTED; fsync(p);
        commit_point(t);
        apply_and_unlock(t, p)
#endif
    :: vol[AT(p, t)] == COMMITTED || vol[AT(p, t)] == ABORTED -> skip
    :: commit && vol[AT(p, t)] == PREPARED && !(past) ->
        vol[AT(p, t)] = COMMITTED;
#ifndef BROKEN_EARLY_ACK
        fsync(p);
#endif
        commit_point(t);
        apply_and_unlock(t, p)
    :: else ->
        if
        :: commit && vol[AT(p, t)] == PREPARED ->
            printf("EV %c: primary S%d refuses the commit: past the deadline of its leases\n", 'A' + t, p)
        :: else -> skip
        fi;
        if
        :: vol[AT(p, t)] == PREPARED -> unlock(t, p)
        :: else -> skip
        fi;
        vol[AT(p, t)] = ABORTED; fsync(p);
        aborted[t] = 1
    fi;
    out = vol[AT(p, t)];
    printf("EV %c: primary S%d, {ask:%d}, records {state:%d}{durable:%d}\n",
           'A' + t, p, commit, out, dur[AT(p, t)] == out)
}

/*
 * Phase two on a non-primary participant s (§5.5): apply the decision. Its COMMIT/ABORT record
 * is appended but not waited for: a restart finds t PREPARED and asks the primary.
 */
inline finish_body(t, s, commit) {
    if
    :: commit && vol[AT(s, t)] == PREPARED ->
        vol[AT(s, t)] = COMMITTED; apply_and_unlock(t, s)
    :: !commit && vol[AT(s, t)] == PREPARED ->
        vol[AT(s, t)] = ABORTED; unlock(t, s)
    :: !commit && vol[AT(s, t)] == NONE ->
        vol[AT(s, t)] = ABORTED                 /* tombstone */
    :: else -> skip                             /* resolved already, or unknown */
    fi;
    quiet_flush(s);
    printf("EV %c: finish on S%d: {state:%d}{durable:%d}\n",
           'A' + t, s, vol[AT(s, t)], dur[AT(s, t)] == vol[AT(s, t)])
}

/* A coordinator (the bus) may crash here; the recovery sweep resolves what it left. */
#define MAY_CRASH \
    if \
    :: d_step { crashes < MAXCRASH -> crashes++; \
                printf("EV %c: the bus coordinating its commit crashes\n", 'A' + t); \
                QUIET_FLUSH_ALL; i = 0 }; \
       goto gone \
    :: skip \
    fi

#ifdef BROKEN_EARLY_RELEASE
/* the leases are released as soon as they are granted, before the commit point */
#define EARLY_RELEASE \
    if \
    :: lease -> \
        d_step { \
            end_leases(t, ro); \
            printf("EV %c: the leases are released, before the commit point\n", 'A' + t) \
        } \
    :: else -> skip \
    fi
#endif

proctype Session(byte t) {
    byte i, u, seen, ok, has, vote, out, s, parts, prim, ro;
    byte known[NK];     /* the new version of each key as the coordinator learned it, 0 = not yet */
    bit commit, lease;
#ifdef RO_2PC
    byte todo;          /* the participants phase one has not reached yet */
#endif

    /* the reads, one request per shard */
#ifndef RO_2PC
    read_shard(t, FIRST(t));
    if
    :: t != 2 -> read_shard(t, 1 - FIRST(t))
    :: else -> skip
    fi;
#else
    if
    :: t == 0 -> read_shard(t, 0); read_shard(t, 1); read_shard(t, 2)
    :: t == 1 -> read_shard(t, 2)
    :: t == 2 -> read_shard(t, 1)
    fi;
#endif

    /* participants: the shards written, and every shard the session holds a token for */
    atomic {
        seen = 0;
        for (i : 0 .. NK - 1) {
            if
            :: BIT(WMASK(t), i) -> parts = parts | (1 << SHARD(i))
            :: else -> skip
            fi
        }
        for (i : 0 .. NS - 1) {
            if
            :: tok[TS(t, i)] != 0 -> parts = parts | (1 << i)
            :: else -> skip
            fi
        }
        i = 0;
        prim = PRIMARY(t);
        ro = parts & ~WSHARDS(t)
    }

    if
    :: (parts & (parts - 1)) == 0 ->
        /* one phase (§5.2): validate, lock, append, fsync, apply; one step here */
        d_step {
            s = (parts == 1 -> 0 : (parts == 2 -> 1 : 2));
            if
            :: !TOKEN_OK(t, s) -> out = EXPIRED
            :: TOKEN_OK(t, s) && IN_GRACE(t, s) -> out = GRACE
            :: else ->
                validate(t, s);
                if
                :: ok ->
                    for (i : 0 .. NK - 1) {
                        if
                        :: BIT(WMASK(t), i) -> tver[KT(t, i)] = ver[i] + 1
                        :: else -> skip
                        fi
                    }
                    vol[AT(s, t)] = COMMITTED; fsync(s);
                    commit_point(t);
                    apply_and_unlock(t, s);
                    out = COMMITTED
                :: else -> out = NO
                fi
            fi;
            printf("EV %c: one-phase commit on S%d: {vote:%d}\n", 'A' + t, s, out);
            if
            :: out == COMMITTED -> report_versions(t, s); acknowledge(t)
            :: else -> skip
            fi;
            i = 0; ok = 0
        }
    :: ro != 0 && ONE_WRITER(t) ->
        /* one writer (prim) and read-only participants (§5.8): validate on each read-only
           participant (a lease), then one phase on the writer with the deadline */
        commit = 1;
        for (s : 0 .. NS - 1) {
            if
            :: BIT(ro, s) -> validate_ro(t, s)
            :: else -> skip
            fi
        }
        MAY_CRASH;      /* the bus dies after the validations: the leases run out on their own */
#ifdef BROKEN_EARLY_RELEASE
        EARLY_RELEASE;
#endif
        d_step {
            s = prim;
            if
            :: !commit -> out = NO      /* withdrawn at the writer (a tombstone), not sent */
            :: commit && !TOKEN_OK(t, s) -> out = EXPIRED
            :: commit && TOKEN_OK(t, s) && IN_GRACE(t, s) -> out = GRACE
            :: commit && TOKEN_OK(t, s) && !IN_GRACE(t, s) && lease && PAST_DEADLINE(t) -> out = LATE
            :: else ->
                validate(t, s);
                if
                :: ok ->
                    for (i : 0 .. NK - 1) {
                        if
                        :: BIT(WMASK(t), i) -> tver[KT(t, i)] = ver[i] + 1
                        :: else -> skip
                        fi
                    }
                    vol[AT(s, t)] = COMMITTED; fsync(s);
                    commit_point(t);
                    apply_and_unlock(t, s);
                    out = COMMITTED
                :: else -> out = NO
                fi
            fi;
            infl = infl & ~(1 << t);
            printf("EV %c: one-phase commit on the writer S%d: {vote:%d}\n", 'A' + t, s, out);
            if
            :: out == COMMITTED -> report_versions(t, s); acknowledge(t)
            :: else -> skip
            fi;
            i = 0; ok = 0
        }
        MAY_CRASH;      /* the bus dies before it releases the leases: they run out */
        d_step {
            end_leases(t, ro);
            printf("EV %c: the leases are released\n", 'A' + t)
        }
    :: else ->
        /* two phases among the writers: prepare, decide on the primary, finish elsewhere */
        commit = 1;
#ifndef RO_2PC
        /* the bus sends the prepares concurrently: they may land in either order */
        if
        :: s = 0
        :: s = 1
        fi;
        if
        :: BIT(parts, s) -> prepare(t, s)
        :: else -> skip
        fi;
        s = 1 - s;
        if
        :: BIT(parts, s) -> prepare(t, s)
        :: else -> skip
        fi;
#else
        /* the bus sends the prepares to the writers and the validations to the read-only
           participants concurrently (§5.3, §5.8): they land in any order */
        todo = parts;
        do
        :: d_step {
               BIT(todo, 0) -> todo = todo & ~1;
               if
               :: BIT(ro, 0) -> validate_ro_body(t, 0)
               :: else -> prepare_body(t, 0)
               fi
           }
        :: d_step {
               BIT(todo, 1) -> todo = todo & ~2;
               if
               :: BIT(ro, 1) -> validate_ro_body(t, 1)
               :: else -> prepare_body(t, 1)
               fi
           }
        :: d_step {
               BIT(todo, 2) -> todo = todo & ~4;
               if
               :: BIT(ro, 2) -> validate_ro_body(t, 2)
               :: else -> prepare_body(t, 2)
               fi
           }
        :: todo == 0 -> break
        od;
#endif
#ifdef BROKEN_EARLY_RELEASE
        EARLY_RELEASE;
#endif
        MAY_CRASH;      /* the bus dies after phase one: leases run out, the sweep resolves */
        atomic {
            /* the decision, with the deadline when a lease was granted (§5.4, §5.8) */
            decide_body(t, prim, commit, (lease && PAST_DEADLINE(t)), out);
            infl = infl & ~(1 << t);
            /* the primary's answer carries its new versions */
            if
            :: out == COMMITTED -> report_versions(t, prim)
            :: else -> skip
            fi;
            i = 0
        }
        MAY_CRASH;      /* the bus dies after the commit point, before phase two */
#ifdef RO_2PC
        /* the outcome is known: the leases are released (§5.8 rule 4) */
        if
        :: lease ->
            d_step {
                end_leases(t, ro);
                printf("EV %c: the leases are released\n", 'A' + t)
            }
        :: else -> skip
        fi;
#endif
        for (s : 0 .. NS - 1) {
            if
            :: s != prim && BIT(parts, s) && !BIT(ro, s) ->
                if
                :: d_step {
                       finish_body(t, s, (out == COMMITTED));
                       /* the finish reply carries the participant's new versions */
                       if
                       :: vol[AT(s, t)] == COMMITTED -> report_versions(t, s)
                       :: else -> skip
                       fi;
                       i = 0
                   }
                /* the participant is unreachable (down, or the reply is lost): it stays
                   PREPARED until the recovery sweep; the client is answered anyway (§5.5) */
                :: d_step {
                       crashes < MAXCRASH -> crashes++;
                       printf("EV %c: finish on S%d is lost: S%d is unreachable\n", 'A' + t, s, s);
                       QUIET_FLUSH_ALL; i = 0
                   }
                fi
            :: else -> skip
            fi
        }
        if
        :: out == COMMITTED ->
            d_step {
                /* I-3, at the moment of the answer */
                assert(dur[AT(prim, t)] == COMMITTED);
                acknowledge(t);
                i = 0
            }
        :: else -> skip
        fi
    fi;
gone:
    /* the session is finished: drop what only it could use (fewer distinct states) */
    skip;
    d_step {
        sessions_done++;
        for (i : 0 .. NK - 1) { dlog[KT(t, i)] = 0 }
        for (i : 0 .. NS - 1) { tok[TS(t, i)] = 0 }
        for (i : 0 .. NK - 1) { known[i] = 0 }
        infl = infl & ~(1 << t);
        i = 0; u = 0; seen = 0; ok = 0; has = 0; out = 0; s = 0; parts = 0; prim = 0;
        ro = 0; commit = 0; lease = 0
    }
}

/* Shard s stops and starts again (§6.1): memory is lost, the durable WAL prefix is replayed. */
inline crash_shard(s) {
    crashes++;
    epoch[s]++;
    printf("EV S%d crashes: memory, delivery log and leases lost; restarts from its fsynced WAL\n", s);
    /* the leases it granted are gone with its memory (the read locks are rebuilt below from
       PREPARE records only); it restarts in its grace, which lasts past their deadlines */
    gwait[s] = ls[s] | gwait[s];
    ls[s] = 0;
#ifndef BROKEN_NO_RESTART_GRACE
    grace[s] = 1;
#endif
    for (i : 0 .. NT - 1) { vol[AT(s, i)] = dur[AT(s, i)] }
    for (i : 0 .. NK - 1) {
        if
        :: SHARD(i) == s ->
            wl[i] = 0; rl[i] = 0; ver[i] = 0;
            for (u : 0 .. NT - 1) {
                if
                :: dur[AT(s, u)] == COMMITTED && BIT(WMASK(u), i) && tver[KT(u, i)] > ver[i] ->
                    ver[i] = tver[KT(u, i)]
                :: else -> skip
                fi;
                /* a PREPARED transaction takes back its write intents and read locks */
                if
                :: dur[AT(s, u)] == PREPARED && BIT(WMASK(u), i) -> wl[i] = u + 1
                :: else -> skip
                fi;
                if
                :: dur[AT(s, u)] == PREPARED && BIT(prl[u], i) -> rl[i] = rl[i] | (1 << u)
                :: else -> skip
                fi
            }
        :: else -> skip
        fi
    }
    QUIET_FLUSH_ALL;
    i = 0; u = 0
}

/*
 * Recovery of t, found PREPARED on shard s (§6.2): ask the primary, which answers its outcome or
 * records an abort now (always safe), then finish t on s.
 */
inline resolve(x) {
    s = x / NT; t = x % NT; prim = PRIMARY(t);
    printf("EV recovery: %c is PREPARED on S%d; asks its primary S%d\n", 'A' + t, s, prim);
    decide_body(t, prim, 0, 0, out);
    finish_body(t, s, (out == COMMITTED));
    s = 0; t = 0; prim = 0; out = 0; i = 0
}

/* deadlines something depends on: a commit point to come, a lease held, a grace waiting */
#ifndef RO_2PC
#define LATE_WANTED (infl | ls[0] | ls[1] | gwait[0] | gwait[1])
#define NO_LEASE    (ls[0] == 0 && ls[1] == 0)
#else
#define LATE_WANTED (infl | ls[0] | ls[1] | ls[2] | gwait[0] | gwait[1] | gwait[2])
#define NO_LEASE    (ls[0] == 0 && ls[1] == 0 && ls[2] == 0)
#endif

/* the leases in mask x on shard s run out */
inline expire(x, s) {
    for (t : 0 .. NT - 1) {
        if
        :: BIT(x, t) -> ls[s] = ls[s] & ~(1 << t); unlock(t, s)
        :: else -> skip
        fi
    }
    printf("EV S%d: the lease of {mask:%d} runs out\n", s, x);
    t = 0; x = 0; i = 0
}

#ifndef RO_2PC
#define ANY_PREPARED \
    (vol[0] == PREPARED || vol[1] == PREPARED || vol[2] == PREPARED || \
     vol[3] == PREPARED || vol[4] == PREPARED || vol[5] == PREPARED)
#else
#define ANY_PREPARED \
    (vol[0] == PREPARED || vol[1] == PREPARED || vol[2] == PREPARED || \
     vol[3] == PREPARED || vol[4] == PREPARED || vol[5] == PREPARED || \
     vol[6] == PREPARED || vol[7] == PREPARED || vol[8] == PREPARED)
#endif
#define UNSYNCED(s) \
    (vol[AT(s, 0)] != dur[AT(s, 0)] || vol[AT(s, 1)] != dur[AT(s, 1)] || \
     vol[AT(s, 2)] != dur[AT(s, 2)])

/* The recovery sweep, background flushes and shard crashes, at any moment. */
proctype Environment() {
    byte i, u, x, t, s, out, prim;
end:
    do
    :: atomic {
           ANY_PREPARED ->
           if      /* any one of them */
           :: vol[0] == PREPARED -> x = 0
           :: vol[1] == PREPARED -> x = 1
           :: vol[2] == PREPARED -> x = 2
           :: vol[3] == PREPARED -> x = 3
           :: vol[4] == PREPARED -> x = 4
           :: vol[5] == PREPARED -> x = 5
#ifdef RO_2PC
           :: vol[6] == PREPARED -> x = 6
           :: vol[7] == PREPARED -> x = 7
           :: vol[8] == PREPARED -> x = 8
#endif
           fi;
           d_step { resolve(x); x = 0 }
       }
    :: d_step { crashes < MAXCRASH && UNSYNCED(0) -> fsync(0); i = 0; printf("EV S0 flushes\n") }
    :: d_step { crashes < MAXCRASH && UNSYNCED(1) -> fsync(1); i = 0; printf("EV S1 flushes\n") }
    :: d_step { crashes < MAXCRASH -> crash_shard(0) }
    :: d_step { crashes < MAXCRASH -> crash_shard(1) }
#ifdef RO_2PC
    :: d_step { crashes < MAXCRASH && UNSYNCED(2) -> fsync(2); i = 0; printf("EV S2 flushes\n") }
    :: d_step { crashes < MAXCRASH -> crash_shard(2) }
#endif
    /* time passes every deadline something still waits for (§5.8: a deadline is real time) */
    :: d_step {
           (LATE_WANTED & ~late) != 0 ->
           late = late | LATE_WANTED;
           printf("EV time passes the deadline of {mask:%d}\n", late)
       }
    /* a lease whose deadline has passed ends on its own */
    :: d_step { (ls[0] & late) != 0 -> x = ls[0] & late; expire(x, 0) }
    :: d_step { (ls[1] & late) != 0 -> x = ls[1] & late; expire(x, 1) }
#ifdef RO_2PC
    :: d_step { (ls[2] & late) != 0 -> x = ls[2] & late; expire(x, 2) }
#endif
    /* a restart grace ends once the deadline of every lease granted before has passed */
    :: d_step { grace[0] && (gwait[0] & ~late) == 0 -> grace[0] = 0; gwait[0] = 0; printf("EV S0's restart grace ends\n") }
    :: d_step { grace[1] && (gwait[1] & ~late) == 0 -> grace[1] = 0; gwait[1] = 0; printf("EV S1's restart grace ends\n") }
#ifdef RO_2PC
    :: d_step { grace[2] && (gwait[2] & ~late) == 0 -> grace[2] = 0; gwait[2] = 0; printf("EV S2's restart grace ends\n") }
#endif
    :: sessions_done == NT && !ANY_PREPARED && NO_LEASE -> break
    od;
    /* quiescent: every decision applied everywhere, nothing of an undecided txn visible */
    atomic {
        assert(NO_LEASE);
        for (i : 0 .. NK - 1) {
            assert(wl[i] == 0 && rl[i] == 0);
            assert(ver[i] == cver[i])
        }
        for (t : 0 .. NT - 1) {
            assert(NOT_BOTH(t));
            assert(!acked[t] || (committed[t] && dur[AT(PRIMARY(t), t)] == COMMITTED));
            for (i : 0 .. NK - 1) {
                if
                :: acked[t] && BIT(WMASK(t), i) -> assert(ver[i] >= tver[KT(t, i)])
                :: else -> skip
                fi
            }
        }
        i = 0; t = 0
    }
}

/* Asserts the invariants I-2, I-3, I-4 in every reachable state (as the ltl blocks do). */
proctype Monitor() {
end:
    atomic {
        !(INV_NOT_BOTH && INV_ACK_DURABLE && INV_VISIBLE) ->
        assert(INV_NOT_BOTH); assert(INV_ACK_DURABLE); assert(INV_VISIBLE)
    }
}

init {
    atomic {
        assert(PRIMARY(0) == PRIMARY_0 && PRIMARY(1) == PRIMARY_1 && PRIMARY(2) == PRIMARY_2);
        run Monitor();
        run Environment();
        run Session(0);
        run Session(1);
        run Session(2)
    }
}
