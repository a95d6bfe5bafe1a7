"""Attack 3: a domain's identity taken by someone else (its token, another uid, a second hello).

A domain proves who it is once, with the one-time token the toolstack gave
its process; the toolstack also tells the broker which uid runs it, and the
kernel tells the broker who connected (SO_PEERCRED).  So a token read or
guessed by a process of another uid is worthless, a used token is dead, and
a connection that has said hello cannot say it again as someone else.
"""

from __future__ import annotations

from .rig import World


def test_token_is_refused_from_another_uid_and_survives_for_its_own(world: World) -> None:
    victim_uid, thief_uid = world.uids.take(), world.uids.take()
    creds = world.mgmt.request("create", name="victim", memory="1M", uid=victim_uid)
    got = world.start_probe(creds, thief_uid)
    assert got["uid"] == thief_uid
    assert got["errno"] == "EACCES", \
        f"uid {thief_uid} said hello with the token of a domain run as uid {victim_uid}: {got}"
    assert world.mgmt.request("info", domid=creds["domid"])["domain"]["state"] == "created"
    victim = world.adopt(creds, victim_uid)        # the refused hello did not spend the token
    assert victim.domid == creds["domid"]
    # A used token is dead, whoever brings it (even the uid it was made for).
    assert world.start_probe(creds, victim_uid)["errno"] == "EACCES"
    assert world.start_probe(creds, thief_uid)["errno"] == "EACCES"
    world.assert_serving(victim)


def test_running_domain_cannot_say_hello_again_or_as_another(world: World) -> None:
    x = world.spawn("thief")
    other_uid = world.uids.take()
    other = world.mgmt.request("create", name="other", memory="1M", uid=other_uid)
    # On its own connection: one connection, one domain, whatever token it brings.
    assert x.call("hello_again", token=other["token"])["errno"] == "EALREADY"
    assert x.call("hello_again", token="0" * 32)["errno"] == "EALREADY"
    # On a connection of its own making: another uid's unused token, then its own used one.
    assert x.call("hello_fresh", token=other["token"])["errno"] == "EACCES"
    assert x.call("hello_fresh", token=x.creds["token"])["errno"] == "EACCES"
    assert world.mgmt.request("info", domid=other["domid"])["domain"]["state"] == "created"
    assert world.mgmt.request("info", domid=x.domid)["domain"]["pid"] == x.pid
    o = world.adopt(other, other_uid)
    world.assert_serving(x, o)
