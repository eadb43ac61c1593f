"""A tiny gateway client for the tests: dispatch, complete, explain."""

from __future__ import annotations

from rest_framework.test import APIClient


class Gateway:
    def __init__(self, plaintext: str) -> None:
        self.client = APIClient()
        self.client.credentials(HTTP_AUTHORIZATION=f"Bearer {plaintext}")

    def dispatch(self, **body):
        return self.client.post("/api/v1/dispatch", body, format="json")

    def explain(self, **body):
        return self.client.post("/api/v1/dispatch/explain", body, format="json")

    def complete(self, lease_id, **body):
        return self.client.post(f"/api/v1/leases/{lease_id}/complete", body, format="json")

    def account_of(self, **body) -> str:
        response = self.dispatch(**body)
        assert response.status_code == 200, response.content
        return response.json()["account"]["name"]

    def cycle(self, outcome="success", **body) -> str:
        """Dispatch and complete at once; the account that served."""
        response = self.dispatch(**body)
        assert response.status_code == 200, response.content
        data = response.json()
        done = self.complete(data["lease_id"], outcome=outcome)
        assert done.status_code == 200, done.content
        return data["account"]["name"]
