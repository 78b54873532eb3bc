/*
 * oribus replicated shard: a Promela model of one replica group, checked exhaustively
 * with SPIN.
 *
 * specs/replication.md is the prose; R-n are its invariants. specs/model/check.py builds
 * and runs this model and its broken variants (broken_repl_*.pml).
 *
 * What is modelled
 *   members    three, each with a durable log (the term of each record), the highest term
 *              it promised (durable), a voter flag (durable), and while its process runs,
 *              the term it leads (if any), whether its TERM_START is committed (serving),
 *              and its primary lease;
 *   etcd       the term register (CAS: one term per election) and the primary key (created
 *              by CAS, deleted when the primary's lease expires);
 *   the data path  a primary appends client records and ships its log to a follower, which
 *              accepts only from a term at least its promise and only where the logs agree
 *              (it then replaces any tail after that point); the primary acknowledges a
 *              record once a majority of voters hold it in its term's log;
 *   elections  a voter with no primary in etcd takes a new term from the register, collects
 *              promises from voters one at a time (appends interleave), and takes over only
 *              if its last position is the highest among a majority, then appends TERM_START
 *              and serves only once that is committed;
 *   faults     a primary's etcd lease expiring at any moment (its process paused, slow or
 *              dead: it may go on acting as primary), a member crash (volatile state lost,
 *              the log kept), a member losing its disk (it restarts as a learner with an
 *              empty log), restarts;
 *   reads      a serving primary answers a read from its log while its primary lease holds;
 *   status     a serving primary answers the outcome of a transaction from a record of its
 *              log (a participant's COMMIT, PROTOCOL.md §10 R-6): whoever asked relies on it
 *              from then on (the recovery sweep releases a decision on it), so the answer
 *              counts as an acknowledgement of that record (the ghost ``acked``).
 * Records are abstracted to their position (term, lsn).
 *
 * The initial group: every member a voter holding TERM_START of term 1, M0 its serving
 * primary. Bounds: 2 client records, 2 elections (terms 2, 3), MAXCRASH crashes and
 * MAXLOSS disk losses.
 *
 * Deliberately broken variants, each of which must yield a counterexample (-D at spin -a;
 * specs/model/broken_repl_*.pml define one each and include this file):
 *   BROKEN_ACK_BEFORE_MAJORITY  a primary acknowledges a record once it holds it alone
 *   BROKEN_ELECT_ANY            a candidate with a majority of promises takes over without
 *                               having the highest last position among them
 *   BROKEN_NO_FENCE             followers accept appends from terms below their promise
 *   BROKEN_LEARNER_VOTES        a member that lost its disk promises (counts in majorities)
 *   BROKEN_NO_TERM_START        a new primary serves at once: it counts older-term records
 *                               committed by their copies alone
 *   BROKEN_NO_LEASE             a primary answers reads without its primary lease
 *   BROKEN_STATUS_BEFORE_MAJORITY  a primary answers a status from any record of its log,
 *                               not only from one its commit index covers
 */

#ifndef MAXCRASH
#define MAXCRASH 1
#endif
#ifndef MAXLOSS
#define MAXLOSS 1
#endif

#ifdef ONLY_LTL
#define assert(e) skip
#endif

#ifdef BROKEN_NO_LEASE
#define LEASE_OK(m) 1
#else
#define LEASE_OK(m) lease[m]
#endif
#ifdef BROKEN_NO_FENCE
#define FENCE_OK(t, f) 1
#else
#define FENCE_OK(t, f) ((t) >= promised[f])
#endif
#ifdef BROKEN_LEARNER_VOTES
#define MAY_PROMISE(v) 1
#else
#define MAY_PROMISE(v) voter[v]
#endif
#ifdef BROKEN_STATUS_BEFORE_MAJORITY
#define STATUS_UPTO(m) loglen[m]
#else
#define STATUS_UPTO(m) commit[m]
#endif
#ifdef BROKEN_ELECT_ANY
#define WINS(m) 1
#else
#define WINS(m) (bestm[m] == m)
#endif

#define NM 3            /* members */
#define MAJ 2           /* a majority of them */
#define MAXLSN 5        /* TERM_START(1) + 2 client records + 2 TERM_STARTs */
#define MAXTERM 3
#define WRITES 2

#define L(m, n)     lterm[(m) * MAXLSN + (n) - 1]     /* term of member m's record n (1-based) */
/* the term of member m's last record (0 for an empty log), without indexing before its log */
#define LAST(m)     lterm[(m) * MAXLSN + (loglen[m] == 0 -> 0 : loglen[m] - 1)] * (loglen[m] != 0)
#define POS(m)      (LAST(m) * 16 + loglen[m])            /* its last position, ordered */

byte lterm[NM * MAXLSN];
byte loglen[NM];           /* durable length of the log */
byte promised[NM];      /* durable */
bit voter[NM];          /* durable */
bit up[NM];

/* etcd */
byte tcount = 1;        /* the term register */
byte prim;          /* the primary key: member + 1, 0 = absent (lease expired) */

/* volatile, per member */
byte myterm[NM];        /* the term it leads, 0 = none */
bit serving[NM];        /* its TERM_START is committed */
bit lease[NM];          /* its primary lease holds */
byte commit[NM];        /* the highest lsn it acknowledged in its term (never goes down) */
byte eterm[NM];         /* the term of its election in progress, 0 = none */
byte pset[NM];          /* voters that promised it, bitmask */
byte best[NM];          /* the highest last position among them */
byte bestm[NM];         /* whose */

byte i;

/* ghosts */
byte acked[MAXLSN];     /* the term of the record acknowledged at each lsn, 0 = none */
byte ackby[MAXLSN];     /* the term of the primary that acknowledged it */
byte writes;
byte crashes;
byte losses;
bit stale_read;
bit lost_ack;

ltl acknowledged_survives { [] !lost_ack }
ltl reads_are_current     { [] !stale_read }

/* the highest lsn held in m's term's log by a majority of voters (m's own copy counting
   if m is a voter); log matching: holding the record at n means agreeing up to n */
inline quorum(m, q) {
    q = 0;
    for (n : 1 .. MAXLSN) {
        if
        :: n <= loglen[m] ->
            c = 0;
            for (v : 0 .. NM - 1) {
                if
                :: voter[v] && loglen[v] >= n && L(v, n) == L(m, n) -> c++
                :: else -> skip
                fi
            }
            if
            :: c >= MAJ -> q = n
            :: else -> skip
            fi
        :: else -> skip
        fi
    }
    n = 0; c = 0; v = 0
}

/* R-2 at the moment a primary starts serving its term: every record acknowledged in an
   earlier term is in its log, at its place */
inline check_holds(m) {
    for (n : 1 .. MAXLSN) {
        if
        :: acked[n - 1] != 0 && ackby[n - 1] < myterm[m] &&
           (loglen[m] < n || L(m, n) != acked[n - 1]) -> lost_ack = 1
        :: else -> skip
        fi
    }
    n = 0;
    assert(!lost_ack)
}

inline step_down(m) {
    myterm[m] = 0; serving[m] = 0; lease[m] = 0; commit[m] = 0
}

proctype Member(byte m) {
    byte n, c, v, q, f, k;
    do
    /* ---- as primary ---------------------------------------------------------------- */
    :: atomic {     /* a client record */
        up[m] && myterm[m] != 0 && serving[m] && myterm[m] >= promised[m] && writes < WRITES &&
        loglen[m] < MAXLSN ->
            writes++; loglen[m]++; L(m, loglen[m]) = myterm[m];
            printf("EV M%d (term %d) appends a client record at lsn %d\n", m, myterm[m], loglen[m])
       }
    :: atomic {     /* ship the log to follower f, consistency check on its side */
        up[m] && myterm[m] != 0 && myterm[m] >= promised[m] ->
            if
            :: f = (m + 1) % NM
            :: f = (m + 2) % NM
            fi;
            if
            :: up[f] && FENCE_OK(myterm[m], f) &&
               (loglen[f] < loglen[m] || (loglen[f] > 0 && (loglen[f] > loglen[m] || L(f, loglen[f]) != L(m, loglen[f])))) ->
                /* k: where the logs agree (the primary resends from there) */
                k = 0;
                do
                :: k < loglen[f] && k < loglen[m] && L(f, k + 1) == L(m, k + 1) -> k++
                :: else -> break
                od;
                /* a batch: the primary's records k+1 .. q, up to any point (a batch may hold
                   part of what the follower lacks); f replaces its tail after k with it */
                q = k + 1;
                do
                :: q < loglen[m] -> q++
                :: break
                od;
                for (n : k + 1 .. MAXLSN) {
                    if
                    :: n <= q -> L(f, n) = L(m, n)
                    :: else -> L(f, n) = 0
                    fi
                }
                loglen[f] = q;
                if
                :: promised[f] < myterm[m] -> promised[f] = myterm[m]
                :: else -> skip
                fi;
                printf("EV M%d (term %d) ships its log to M%d: agree up to %d, now %d records\n",
                       m, myterm[m], f, k, loglen[f]);
                /* a learner that now holds everything the primary acknowledged becomes a voter
                   (its acknowledged lsn, not the quorum over today's voters: that can go
                   down when a voter loses its disk) */
                if
                :: !voter[f] && serving[m] && loglen[f] >= commit[m] -> voter[f] = 1;
                   printf("EV M%d holds every committed record: a voter again\n", f)
                :: else -> skip
                fi;
                n = 0; k = 0; q = 0
            :: else -> skip
            fi;
            f = 0
       }
    :: atomic {     /* acknowledge what a majority holds (and, before serving, TERM_START) */
        up[m] && myterm[m] != 0 && myterm[m] >= promised[m] ->
#ifdef BROKEN_ACK_BEFORE_MAJORITY
            q = loglen[m];
#else
            quorum(m, q);
#endif
            if
            :: !serving[m] && q == loglen[m] && q > 0 && L(m, q) == myterm[m] ->
                serving[m] = 1;         /* its TERM_START is committed: everything before too */
                commit[m] = q;
                printf("EV M%d serves term %d\n", m, myterm[m]);
                check_holds(m)
            :: else -> skip
            fi;
            if
            :: serving[m] ->
                for (n : 1 .. MAXLSN) {
                    if
                    :: n <= q && acked[n - 1] == 0 ->
                        acked[n - 1] = L(m, n); ackby[n - 1] = myterm[m];
                        if
                        :: commit[m] < n -> commit[m] = n
                        :: else -> skip
                        fi;
                        printf("EV M%d acknowledges lsn %d of term %d\n", m, n, L(m, n))
                    :: n <= q && acked[n - 1] != 0 && acked[n - 1] != L(m, n) ->
                        lost_ack = 1        /* an acknowledged record was replaced */
                    :: else -> skip
                    fi
                }
                assert(!lost_ack)
            :: else -> skip
            fi;
            n = 0; q = 0
       }
    :: atomic {     /* a read: it must reflect every acknowledged record */
        up[m] && myterm[m] != 0 && serving[m] && myterm[m] >= promised[m] && LEASE_OK(m) ->
            for (n : 1 .. MAXLSN) {
                if
                :: acked[n - 1] != 0 && (loglen[m] < n || L(m, n) != acked[n - 1]) -> stale_read = 1
                :: else -> skip
                fi
            }
            n = 0;
            printf("EV M%d (term %d) answers a read\n", m, myterm[m]);
            assert(!stale_read)
       }
    :: atomic {     /* a status: the outcome a record of its log holds (R-6), relied on from now */
        up[m] && myterm[m] != 0 && serving[m] && myterm[m] >= promised[m] && STATUS_UPTO(m) > 0 ->
            n = 1;
            do
            :: n < STATUS_UPTO(m) -> n++
            :: break
            od;
            if
            :: acked[n - 1] == 0 ->
                acked[n - 1] = L(m, n); ackby[n - 1] = myterm[m];
                printf("EV M%d (term %d) answers a status from its record at lsn %d\n", m, myterm[m], n)
            :: else -> skip
            fi;
            n = 0
       }
    :: atomic {     /* a primary that promised a higher term steps down */
        up[m] && myterm[m] != 0 && myterm[m] < promised[m] ->
            printf("EV M%d steps down: it promised term %d\n", m, promised[m]);
            step_down(m)
       }
    /* ---- elections ------------------------------------------------------------------ */
    :: atomic {     /* no primary in etcd: take a new term from the register (CAS) */
        up[m] && voter[m] && myterm[m] == 0 && eterm[m] == 0 && prim == 0 && tcount < MAXTERM &&
        promised[m] < tcount + 1 ->
            tcount++; eterm[m] = tcount;
            promised[m] = tcount; pset[m] = 1 << m; best[m] = POS(m); bestm[m] = m;
            printf("EV M%d starts an election for term %d, last position (%d, %d)\n",
                   m, tcount, LAST(m), loglen[m])
       }
    :: atomic {     /* a promise from voter v */
        up[m] && eterm[m] != 0 ->
            if
            :: v = (m + 1) % NM
            :: v = (m + 2) % NM
            fi;
            if
            :: up[v] && !(pset[m] & (1 << v)) && promised[v] < eterm[m] && MAY_PROMISE(v) ->
                promised[v] = eterm[m]; pset[m] = pset[m] | (1 << v);
                if
                :: POS(v) > best[m] || (POS(v) == best[m] && v < bestm[m]) -> best[m] = POS(v); bestm[m] = v
                :: else -> skip
                fi;
                printf("EV M%d promises term %d to M%d, last position (%d, %d)\n", v, eterm[m], m, LAST(v), loglen[v])
            :: else -> skip
            fi;
            v = 0
       }
    :: atomic {     /* a majority promised: take over (CAS on etcd), or give up */
        up[m] && eterm[m] != 0 &&
        ((pset[m] & 1) + ((pset[m] >> 1) & 1) + ((pset[m] >> 2) & 1)) >= MAJ ->
            if
            :: prim == 0 && tcount == eterm[m] && loglen[m] < MAXLSN && WINS(m) ->
                prim = m + 1; myterm[m] = eterm[m]; lease[m] = 1;
                loglen[m]++; L(m, loglen[m]) = myterm[m];     /* TERM_START */
#ifdef BROKEN_NO_TERM_START
                serving[m] = 1;
#endif
                printf("EV M%d takes over as primary of term %d and appends TERM_START at lsn %d\n",
                       m, myterm[m], loglen[m])
            :: else ->
                printf("EV M%d gives up the election for term %d\n", m, eterm[m])
            fi;
            eterm[m] = 0; pset[m] = 0; best[m] = 0; bestm[m] = 0
       }
    od
}

/* time and failures */
proctype Environment() {
    byte m;
    do
    :: atomic {     /* the primary's etcd lease expires: its lease ends first (§6), then the key */
        prim != 0 && tcount < MAXTERM ->
            lease[prim - 1] = 0;
            printf("EV the lease of M%d expires: etcd deletes the primary key\n", prim - 1);
            prim = 0
       }
    :: atomic {     /* a member's process dies: its log stays */
        crashes < MAXCRASH ->
            if
            :: m = 0
            :: m = 1
            :: m = 2
            fi;
            if
            :: up[m] -> crashes++; up[m] = 0; step_down(m);
                eterm[m] = 0; pset[m] = 0; best[m] = 0; bestm[m] = 0;
                printf("EV M%d crashes\n", m)
            :: else -> skip
            fi
       }
    :: atomic {     /* a member loses its disk: it restarts as a learner with an empty log */
        losses < MAXLOSS ->
            if
            :: m = 0
            :: m = 1
            :: m = 2
            fi;
            losses++; step_down(m);
            eterm[m] = 0; pset[m] = 0; best[m] = 0; bestm[m] = 0;
            for (i : 1 .. MAXLSN) { L(m, i) = 0 }
            loglen[m] = 0; voter[m] = 0;
            /* its promise was on that disk; on start it takes the term register's value */
            promised[m] = tcount; up[m] = 1;
            printf("EV M%d loses its disk and rejoins as a learner\n", m)
       }
    :: atomic {     /* a crashed member restarts (as a follower) */
        if
        :: m = 0
        :: m = 1
        :: m = 2
        fi;
        if
        :: !up[m] -> up[m] = 1;
            if
            :: promised[m] < tcount -> promised[m] = tcount
            :: else -> skip
            fi;
            printf("EV M%d restarts\n", m)
        :: else -> skip
        fi
       }
    :: else -> break
    od
}

init {
    atomic {
        for (i : 0 .. NM - 1) {
            L(i, 1) = 1; loglen[i] = 1; promised[i] = 1; voter[i] = 1; up[i] = 1
        }
        myterm[0] = 1; serving[0] = 1; lease[0] = 1; commit[0] = 1; acked[0] = 1; ackby[0] = 1; prim = 1;
        i = 0;
        run Member(0); run Member(1); run Member(2); run Environment()
    }
}
